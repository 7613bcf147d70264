"""One atomic writer (checkpoint/atomic.py), and every file scratchlm saves goes through it."""

from __future__ import annotations

import json
import os

import pytest

from scratchlm.checkpoint import atomic
from scratchlm.checkpoint.atomic import atomic_dir, atomic_path, write_json_atomic


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(atomic.TMP_PREFIX))


def test_atomic_path_fsyncs_then_replaces(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "f.json"
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    write_json_atomic(target, {"a": "é"})
    assert target.read_text(encoding="utf-8") == '{\n  "a": "é"\n}\n'
    assert len(synced) == 2  # the file, then its directory entry
    assert leftovers(target.parent) == []


def test_atomic_path_leaves_the_old_file_on_any_failure(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    for error in (OSError("disk full"), KeyboardInterrupt()):
        with pytest.raises(type(error)), atomic_path(target) as tmp:
            tmp.write_text("half a fi")
            raise error
        assert target.read_text() == "old" and leftovers(tmp_path) == []


def test_atomic_dir_swaps_a_whole_directory(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with atomic_dir(target) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    with pytest.raises(OSError), atomic_dir(target) as tmp:
        (tmp / "c").write_text("3")
        raise OSError("interrupted")
    assert sorted(p.name for p in target.iterdir()) == ["b"] and leftovers(tmp_path) == []


def _writers(tmp_path):
    """(name, write(path), path) for each file scratchlm saves outside a run dir's own writer."""
    from scratchlm.checkpoint.hf import save_hf
    from scratchlm.cli.chat import ChatSession
    from scratchlm.generation import SamplingParams
    from scratchlm.models import build_model, from_preset
    from scratchlm.models.ngram import NGramCounts
    from scratchlm.tokenizers.char import CharTokenizer
    from scratchlm.tokenizers.train_bpe import train_bpe

    bpe = train_bpe("a tiny corpus for a tiny tokenizer. " * 5, 262, special_tokens=("<|endoftext|>",))
    char = CharTokenizer.from_text("abc")
    counts = NGramCounts(2, "kneser-ney").fit([["a", "b"], ["a", "c", "b"]])
    config = from_preset("tiny-llama", vocab_size=bpe.vocab_size)
    model = build_model(config).eval()
    session = ChatSession(lm=None, params=SamplingParams(), system="s")
    return [
        ("bpe tokenizer.json", lambda d: bpe.save(d), tmp_path / "bpe" / "tokenizer.json"),
        ("char tokenizer", lambda d: char.save(d), tmp_path / "char"),
        ("n-gram counts", lambda d: counts.save(d / "c.safetensors"), tmp_path / "ng" / "c.safetensors"),
        ("ARPA", lambda d: counts.write_arpa(d / "c.arpa"), tmp_path / "arpa" / "c.arpa"),
        ("HF config.json", lambda d: save_hf(model, config, d, bpe), tmp_path / "hf" / "config.json"),
        ("HF weights", lambda d: save_hf(model, config, d, bpe), tmp_path / "hfw" / "model.safetensors"),
        ("chat /save", lambda d: session.save(str(d / "chat.json")), tmp_path / "chat" / "chat.json"),
    ]


@pytest.mark.parametrize("index", range(7))
def test_every_saver_writes_atomically(tmp_path, monkeypatch, index):
    name, write, path = _writers(tmp_path)[index]
    directory = path if path.suffix == "" else path.parent
    directory.mkdir(parents=True)
    write(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    assert files, name
    before = {p: p.read_bytes() for p in files}

    def crash(src, dst):
        raise OSError("crash before the rename")

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(OSError, match="crash before the rename"):  # so it renames into place...
        write(directory)
    monkeypatch.undo()
    assert synced, name  # ...after an fsync
    after = sorted(p for p in directory.rglob("*") if p.is_file())
    assert after == files and {p: p.read_bytes() for p in files} == before, name  # no temporary left


def test_chat_save_is_the_conversation_as_json(tmp_path):
    from scratchlm.cli.chat import ChatSession
    from scratchlm.generation import SamplingParams

    session = ChatSession(lm=None, params=SamplingParams(), system="Be brief.")
    session.messages.append({"role": "user", "content": "héllo"})
    path = session.save(str(tmp_path / "c.json"))
    assert json.loads(path.read_text(encoding="utf-8")) == session.messages
