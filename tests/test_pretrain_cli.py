"""``scratchlm pretrain`` and ``scratchlm eval perplexity``: a tiny run, resume, and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from scratchlm.checkpoint import io
from scratchlm.tokenizers import CharTokenizer

TEXT = ("ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
        "JULIET:\nO Romeo, Romeo, wherefore art thou Romeo?\n") * 15
TINY = ["--preset", "tiny-gpt2", "--context-length", "16", "--batch-size", "4", "--eval-every", "2",
        "--eval-batches", "1", "--sample-tokens", "8"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def one_line_error(code, err, *fragments):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and " — " in lines[0], err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bad_inputs_are_one_line_errors_and_write_nothing(run_cli, tmp_path, corpus):
    out = tmp_path / "run"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("too short for a window")
    saved_tok = tmp_path / "tok"
    CharTokenizer.from_text("abc").save(saved_tok)
    cases = [
        (["--data", tmp_path / "missing.txt"], "not found"),
        (["--data", empty], "empty"),
        (["--data", short], "fewer than one context window"),
        (["--data", corpus, "--preset", "tiny-gtp2"], "did you mean tiny-gpt2"),
        (["--data", corpus, "--preset", "tiny-gpt2", "--context-length", "128"],
         "longer than the 64 positions"),
        (["--data", corpus, "--tokenizer", "bpe:lots"], "bpe:N"),
        (["--data", corpus, "--tokenizer", tmp_path / "no-such-tokenizer"], "tokenizer not found"),
        (["--data", corpus, "--tokenizer", saved_tok], "not in the 3-character vocabulary"),
        (["--data", corpus, "--batch-size", "0", "--preset", "tiny-gpt2"], "batch_size"),
    ]
    for args, fragment in cases:
        code, _, err = run_cli("pretrain", *args, "--out", out, "--max-steps", "1")
        one_line_error(code, err, fragment)
        assert not out.exists(), args


def test_existing_run_dir_is_not_clobbered(run_cli, tmp_path, corpus):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, _, err = run_cli("pretrain", "--data", corpus, "--out", out, "--max-steps", "1")
    one_line_error(code, err, "already exists", "--resume")
    assert snapshot(out) == {out.joinpath("precious.txt").relative_to(out): b"keep me"}


def test_train_resume_and_evaluate(run_cli, tmp_path, corpus):
    run = tmp_path / "run"
    code, out, err = run_cli("pretrain", *TINY, "--data", corpus, "--max-steps", "4", "--out", run)
    assert code == 0, err
    assert f"run dir:    {run}" in out and "loss.png" in out and "--- sample" in out
    for name in ("config.json", "model.safetensors", "tokenizer", "train_state.safetensors",
                 "train_state.json", "metrics.jsonl", "loss.png", "samples.txt"):
        assert (run / name).exists(), name
    data = json.loads((run / "config.json").read_text())["data"]
    assert data["tokenizer"] == "char" and data["val_fraction"] == 0.1

    before = snapshot(run)
    code, _, err = run_cli("pretrain", "--resume", run)
    one_line_error(code, err, "already reached its budget")
    code, _, err = run_cli("pretrain", "--resume", run, "--max-steps", "6", "--lr", "0.5")
    one_line_error(code, err, "--lr 0.5 differs")
    code, _, err = run_cli("pretrain", "--resume", run, "--max-steps", "6", "--preset", "gpt2-124m")
    one_line_error(code, err, "--preset gpt2-124m differs")
    assert snapshot(run) == before

    code, out, err = run_cli("pretrain", "--resume", run, "--max-steps", "6")
    assert code == 0, err
    assert json.loads((run / "train_state.json").read_text())["step"] == 6
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "eval"]
    assert steps == [2, 4, 6]

    code, out, err = run_cli("eval", "perplexity", "--model", run, "--data", corpus, "--split", "val",
                             "--stride", "8")
    assert code == 0, err
    values = dict(line.split(None, 1) for line in out.splitlines())
    assert float(values["perplexity"]) > 1 and float(values["nats/char"]) == pytest.approx(
        float(values["loss"].split()[0]), rel=1e-3)  # char level: nats per token = nats per char
    code, _, err = run_cli("eval", "perplexity", "--model", run, "--data", corpus, "--context-length", "99")
    one_line_error(code, err, "exceeds the model's 16 positions")


def test_a_tokenizer_bigger_than_the_model_is_refused(run_cli, tmp_path, corpus):
    run = tmp_path / "run"
    assert run_cli("pretrain", *TINY, "--data", corpus, "--max-steps", "1", "--out", run)[0] == 0
    # Swap in a tokenizer with more characters (ids shift past the model's vocabulary).
    CharTokenizer.from_text(TEXT + "0123456789").save(run / "tokenizer")
    before = snapshot(run)
    code, _, err = run_cli("pretrain", "--resume", run, "--max-steps", "2")
    one_line_error(code, err, "outside the model's vocabulary")
    assert snapshot(run) == before


def test_ctrl_c_saves_and_exits_130(run_cli, tmp_path, corpus, monkeypatch):
    from scratchlm.training.trainer import Trainer

    original = Trainer.__init__

    def with_interrupt(self, *args, **kwargs):
        original(self, *args, **kwargs)

        def interrupt(trainer):
            if trainer.step == 2:
                raise KeyboardInterrupt

        self.callbacks.append(interrupt)

    monkeypatch.setattr(Trainer, "__init__", with_interrupt)
    run = tmp_path / "run"
    code, _, err = run_cli("pretrain", *TINY, "--data", corpus, "--max-steps", "10", "--out", run)
    assert code == 130
    assert f"--resume {run}" in err
    assert json.loads((run / io.STATE_INFO_FILE).read_text())["step"] == 2
    assert io.load_run(run)[2].name == "tiny-gpt2"
