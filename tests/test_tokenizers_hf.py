"""Hugging Face ``tokenizer.json``: we encode exactly as ``tokenizers.Tokenizer.from_file``.

The test files are built here, with the ``tokenizers`` API, from GPT-2's vocabulary and merges
dressed in the pre-tokenizer shapes of real files (GPT-2, Llama 3, Qwen2, SmolLM2, GPT-4's
pattern as our trainer writes it) and with added tokens, so nothing is downloaded.
"""

from __future__ import annotations

import json

import pytest
import tokenizers
from hypothesis import given
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from conftest import shared_path
from scratchlm.data.corpora import read_corpus
from scratchlm.errors import DataError, UserError
from scratchlm.tokenizers import ByteLevelBPE, load
from scratchlm.tokenizers.bpe import GPT4_PATTERN
from test_split_patterns import PUBLISHED
from test_tokenizers_bpe import PARITY, TEXT

CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


def _split(pattern: str):
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _build(kind: str, directory):
    """Write DIR/tokenizer.json of one shape; returns the directory."""
    encoder_json = shared_path("data", "gpt2", "encoder.json")
    vocab_bpe = shared_path("data", "gpt2", "vocab.bpe")
    bpe = models.BPE.from_file(str(encoder_json), str(vocab_bpe), ignore_merges=kind == "llama3")
    tok = tokenizers.Tokenizer(bpe)
    tok.decoder = decoders.ByteLevel()
    specials, added = ["<|endoftext|>"], []
    if kind == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif kind == "llama3":
        tok.pre_tokenizer = _split(PUBLISHED["llama3"])  # Meta's pattern, not ours
        specials += ["<|begin_of_text|>", "<|eot_id|>"]
    elif kind == "qwen2":
        tok.pre_tokenizer = _split(PUBLISHED["qwen2"])  # Qwen's pattern, not ours
        tok.normalizer = normalizers.NFC()
        specials += ["<|im_start|>", "<|im_end|>"]
        added = ["<think>", "</think>"]
    elif kind == "smollm2":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        specials += ["<|im_start|>", "<|im_end|>"]
    elif kind == "gpt4":
        tok.pre_tokenizer = _split(GPT4_PATTERN)
    elif kind == "strip":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        stripped = AddedToken("<|im_end|>", lstrip=True, rstrip=True, normalized=False, special=True)
        tok.add_special_tokens([stripped])
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
    tok.add_tokens([AddedToken(s, normalized=False, special=False) for s in added])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory


KINDS = ["gpt2", "llama3", "qwen2", "smollm2", "gpt4", "strip"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """kind -> (ours, theirs), loaded from the same file."""
    root = tmp_path_factory.mktemp("hf")
    built = {}
    for kind in KINDS:
        path = _build(kind, root / kind) / "tokenizer.json"
        built[kind] = (load(path), tokenizers.Tokenizer.from_file(str(path)))
    return built


def _theirs(hf, text: str) -> list[int]:
    return hf.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("kind", KINDS)
def test_corpus_matches_hf(pairs, kind):
    ours, hf = pairs[kind]
    text = read_corpus("builtin:the-verdict") + "\n1234 5,000 x  9\r\n<|endoftext|>'LL ſ\u00a0 e\u0301"
    assert ours.encode(text, allowed_special="all") == _theirs(hf, text)


def test_tinyshakespeare_matches_hf_llama3_shape(pairs):
    ours, hf = pairs["llama3"]
    text = read_corpus("builtin:tinyshakespeare")
    assert ours.encode(text) == _theirs(hf, text)


@pytest.mark.parametrize("kind", KINDS)
@PARITY
@given(text=TEXT)
def test_any_text_matches_hf(pairs, kind, text):
    ours, hf = pairs[kind]
    assert ours.encode(text, allowed_special="all") == _theirs(hf, text)


def test_shapes_are_read_as_intended(pairs):
    assert pairs["gpt2"][0].pattern == pairs["strip"][0].pattern
    assert pairs["llama3"][0].ignore_merges and pairs["llama3"][0].pattern == PUBLISHED["llama3"]
    qwen = pairs["qwen2"][0]
    assert qwen.normalizer == "NFC" and set(qwen.added_tokens) == {"<think>", "</think>"}
    # Non-special added tokens are always matched whole, as Hugging Face does.
    assert qwen.encode("a<think>b") == _theirs(pairs["qwen2"][1], "a<think>b")
    assert qwen.decode(qwen.encode("<think>hi</think>")) == "<think>hi</think>"


def test_tokenizer_config_supplies_chat_template_and_eos(pairs, tmp_path):
    directory = _build("qwen2", tmp_path / "qwen")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": {"content": "<|im_end|>"}, "bos_token": None, "chat_template": CHAT_TEMPLATE,
    }), encoding="utf-8")
    tok = load(directory)
    assert tok.chat_template == CHAT_TEMPLATE and tok.eos_token == "<|im_end|>"
    assert tok.eos_id == tok.token_to_id("<|im_end|>") and tok.bos_id is None
    # ... and save() writes both files back, loadable by us and by Hugging Face.
    tok.save(tmp_path / "again")
    again = load(tmp_path / "again")
    assert (again.chat_template, again.eos_id, again.normalizer) == (CHAT_TEMPLATE, tok.eos_id, "NFC")
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "again" / "tokenizer.json"))
    text = "<|im_start|>user\nCafe\u0301 <think> 12 'S<|im_end|>\n"
    ids = again.encode(text, allowed_special="all")
    assert ids == _theirs(hf, text) == tok.encode(text, allowed_special="all")


def test_pretrained_tokenizer_fast_loads_our_save(pairs, tmp_path):
    import transformers
    ours = pairs["llama3"][0]
    ours.chat_template = CHAT_TEMPLATE
    ours.save(tmp_path)
    ours.chat_template = None
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    text = "Hello <|eot_id|> world 12345"
    assert hf.encode(text, add_special_tokens=False) == ours.encode(text, allowed_special="all")
    assert hf.chat_template == CHAT_TEMPLATE and hf.eos_token == "<|endoftext|>"


# ----- refusals and damage ------------------------------------------------------------------------

def _write(path, doc):
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def test_refuses_other_models(tmp_path):
    vocab = {"[UNK]": 0, "a": 1, "b": 2, "ab": 3}
    cases = {
        "WordPiece": tokenizers.Tokenizer(models.WordPiece(vocab, unk_token="[UNK]")),
        "Unigram": tokenizers.Tokenizer(models.Unigram([("[UNK]", 0.0), ("a", -1.0)], 0)),
        "byte_fallback": tokenizers.Tokenizer(models.BPE(vocab, [("a", "b")], byte_fallback=True)),
    }
    for name, tok in cases.items():
        tok.save(str(tmp_path / f"{name}.json"))
        with pytest.raises(UserError, match="not byte-level BPE") as err:
            load(tmp_path / f"{name}.json")
        assert "\n" not in str(err.value)


def test_refuses_unsupported_pre_tokenizer(pairs, tmp_path):
    doc = pairs["gpt2"][0].to_hf_json()
    doc["pre_tokenizer"] = {"type": "Whitespace"}
    with pytest.raises(UserError, match="unsupported pre_tokenizer Whitespace"):
        ByteLevelBPE.from_tokenizer_json(_write(tmp_path / "tokenizer.json", doc))


def test_damaged_tokenizer_json(pairs, tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"model": {"type": "BPE", ', encoding="utf-8")
    with pytest.raises(DataError, match="tokenizer.json is not valid JSON"):
        load(path)
    _write(path, {"version": "1.0"})
    with pytest.raises(DataError, match="has no 'model' section"):
        load(path)
    doc = pairs["gpt2"][0].to_hf_json()
    doc["model"]["merges"] = ["Ġ t", "not-a-pair"]
    with pytest.raises(DataError, match="merge 2 .*not two byte-level tokens"):
        load(_write(path, doc))
    doc = pairs["gpt2"][0].to_hf_json()
    del doc["model"]["vocab"]["Ġt"]
    with pytest.raises(DataError, match="merge 1 .*not in the vocabulary"):
        load(_write(path, doc))
