"""GGUF vocabularies: SmolLM2's file against the tokenizer transformers builds from it."""

from __future__ import annotations

import re

import gguf
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from conftest import shared_path
from scratchlm.data.corpora import read_corpus
from scratchlm.errors import CheckpointError, DataError
from scratchlm.tokenizers import ByteLevelBPE, load
from scratchlm.tokenizers.bpe import (
    GGUF_PATTERN_KEY,
    GPT4_PATTERN,
    LLAMA3_PATTERN,
    SMOLLM2_PATTERN,
    bytes_to_token,
)
from test_tokenizers_bpe import FRAGMENTS, TEXT

CHATML = "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n" \
         "<|im_start|>assistant\n42 🙂<|im_end|>\n"
NO_DIGITS = TEXT.filter(lambda t: not re.search(r"\d", t) and not any(c.isnumeric() for c in t))
FEW = settings(max_examples=100, deadline=None)


@pytest.fixture(scope="module")
def smollm2():
    """(ours, transformers') tokenizers from the same GGUF file; transformers takes a while."""
    import transformers
    path = shared_path("models", "SmolLM2-135M-Instruct.Q4_1.gguf")
    theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return load(path), theirs


def test_metadata(smollm2):
    ours, theirs = smollm2
    assert ours.vocab_size == 49_152 == len(theirs)
    assert ours.eos_token == "<|im_end|>" == theirs.eos_token and ours.eos_id == 2
    assert ours.bos_token == "<|im_start|>" == theirs.bos_token and ours.bos_id == 1
    assert ours.chat_template == theirs.chat_template and "<|im_start|>" in ours.chat_template
    assert ours.pattern == SMOLLM2_PATTERN
    assert {"<|endoftext|>", "<|im_start|>", "<|im_end|>"} <= set(ours.special_tokens)


@pytest.mark.parametrize("corpus", ["builtin:the-verdict", "builtin:tinyshakespeare"])
def test_corpora_match_transformers(smollm2, corpus):
    ours, theirs = smollm2
    text = read_corpus(corpus)
    assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)


def test_chatml_matches_transformers(smollm2):
    ours, theirs = smollm2
    ids = ours.encode(CHATML, allowed_special={"<|im_start|>", "<|im_end|>"})
    assert ids == theirs.encode(CHATML, add_special_tokens=False)
    assert ids.count(ours.eos_id) == 3
    assert ours.decode(ids) == CHATML == theirs.decode(ids)


@FEW
@given(text=NO_DIGITS)
@example(text='"\x06:')  # SmolLM2 lacks byte 0x06: dropped before merging, so '":' is one token
def test_text_matches_transformers(smollm2, text):
    ours, theirs = smollm2
    assert ours.encode(text, allowed_special="all") == theirs.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def smollm2_as_published(smollm2):
    """transformers' tokenizer with the pre-tokenizer of SmolLM2's own tokenizer.json.

    transformers has no split rule for GGUF ``pre = "smollm"`` and falls back to GPT-2's regex,
    which differs on whitespace before a digit ("x  9").  SmolLM2's tokenizer.json (and
    llama.cpp's ``smollm`` rule) isolate every digit first; that is what we implement.
    """
    from tokenizers import Tokenizer, pre_tokenizers

    backend = Tokenizer.from_str(smollm2[1].backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    return backend


DIGITS = ["9", " 7", "  12", "x  9", "3.14", "٣", "²"]
WITH_DIGITS = st.lists(st.sampled_from([*FRAGMENTS, *DIGITS]), max_size=20)


@FEW
@given(text=WITH_DIGITS.map("".join))
def test_digits_follow_smollm2s_own_rule(smollm2, smollm2_as_published, text):
    ours, _ = smollm2
    expected = smollm2_as_published.encode(text, add_special_tokens=False).ids
    assert ours.encode(text, allowed_special="all") == expected


def test_gpt2_fallback_differs_only_around_digits(smollm2):
    ours, theirs = smollm2
    assert ours.encode("x  9") != theirs.encode("x  9", add_special_tokens=False)
    assert ours.decode(ours.encode("x  9")) == "x  9"


# ----- GGUF files written here --------------------------------------------------------------------

def _write_gguf(path, tokens, model="gpt2", pre="gpt2", merges=None, types=None):
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types or [gguf.TokenType.NORMAL] * len(tokens))
    if merges is not None:
        writer.add_token_merges(merges)
    if model == "llama":
        writer.add_token_scores([0.0] * len(tokens))
    writer.add_eos_token_id(len(tokens) - 1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gpt2_vocabulary_in_gguf_encodes_like_gpt2_files(tmp_path):
    gpt2 = load(shared_path("data", "gpt2", "encoder.json").parent)
    tokens = [bytes_to_token(t) for t, _ in sorted(gpt2.encoder.items(), key=lambda kv: kv[1])]
    types = [gguf.TokenType.NORMAL] * (len(tokens) - 1) + [gguf.TokenType.CONTROL]
    merges = [f"{bytes_to_token(a)} {bytes_to_token(b)}" for a, b in gpt2.merges]
    path = _write_gguf(tmp_path / "gpt2.gguf", tokens, merges=merges, types=types)
    ours = ByteLevelBPE.from_gguf(path)
    assert ours.special_tokens == {"<|endoftext|>": 50256} and ours.eos_id == 50256
    text = read_corpus("builtin:the-verdict") + " 12 <|endoftext|>"
    assert ours.encode(text, allowed_special="all") == gpt2.encode(text, allowed_special="all")


def test_sentencepiece_gguf_is_refused(tmp_path):
    path = _write_gguf(tmp_path / "spm.gguf", ["<unk>", "<s>", "</s>", "▁a"], model="llama", pre=None)
    with pytest.raises(DataError, match="tokenizer.ggml.model='llama', not byte-level BPE") as err:
        load(path)
    assert "only byte-level BPE GGUF" in str(err.value) and "\n" not in str(err.value)


def test_unknown_pre_tokenizer_is_refused(tmp_path):
    path = _write_gguf(tmp_path / "odd.gguf", ["a", "b"], pre="mystery-bpe", merges=[])
    with pytest.raises(DataError, match="unknown pre-tokenizer tokenizer.ggml.pre='mystery-bpe'"):
        load(path)


def test_damaged_gguf(tmp_path):
    """The tokenizer reads the header with the model loader's reader (checkpoint.gguf_file)."""
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all, just text" * 3)
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load(tmp_path / "junk.gguf")
    good = _write_gguf(tmp_path / "cut.gguf", ["a", "b"], merges=[])
    (tmp_path / "cut.gguf").write_bytes(good.read_bytes()[:60])
    with pytest.raises(CheckpointError, match="cannot read the GGUF header"):
        load(tmp_path / "cut.gguf")


# ----- cl100k vocabularies (train_bpe's default split) exported by save_gguf -----------------------

# Documents that end in whitespace with line breaks, so that the vocabulary merges such runs: the one
# place where cl100k and llama.cpp's nearest pre-tokenizer, llama-bpe, split differently.
CODE = [f"def f{i}(x):\n    return x + {i}\n  \n" for i in range(40)] + ["tiny corpus, fine.\n\n  "] * 20
WHITESPACE_END = st.lists(st.sampled_from(["\n", "\n\n", " ", "  ", "\t", "\r\n", "\r"]), max_size=4)


@pytest.fixture(scope="module")
def cl100k_gguf(tmp_path_factory):
    """(tokenizer, the GGUF file save_gguf writes it into, with a tiny GPT-2 model)."""
    from scratchlm.checkpoint.gguf import save_gguf
    from scratchlm.models import build_model, from_preset
    from scratchlm.tokenizers.train_bpe import train_bpe

    tok = train_bpe(CODE, 320, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    assert tok.pattern == GPT4_PATTERN
    config = from_preset("tiny-gpt2", vocab_size=tok.vocab_size)
    path = tmp_path_factory.mktemp("cl100k") / "m.gguf"
    with pytest.warns(UserWarning, match=r"the nearest, 'llama-bpe'.*scratchlm\.tokenizer\.pattern"):
        save_gguf(build_model(config), config, path, tok, quant="f32")
    return tok, path


def test_cl100k_export_names_llama_bpe_and_holds_the_exact_pattern(cl100k_gguf):
    tok, path = cl100k_gguf
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["tokenizer.ggml.pre"].contents() == "llama-bpe"
    assert fields[GGUF_PATTERN_KEY].contents() == GPT4_PATTERN
    # The difference the key carries: this vocabulary merges a final "\n  " that llama-bpe would cut.
    text = "return x\n  "
    llama_bpe = ByteLevelBPE(tok.encoder, tok.merges, tok.special_tokens, LLAMA3_PATTERN)
    assert tok.encode(text) != llama_bpe.encode(text)
    assert load(path).pattern == GPT4_PATTERN


@pytest.fixture(scope="module")
def cl100k_read_back(cl100k_gguf):
    return load(cl100k_gguf[1])


@FEW
@given(text=st.tuples(TEXT, WHITESPACE_END.map("".join)).map("".join))
@example(text="return x\n  ")
@example(text="x \n\t")
def test_cl100k_gguf_encodes_as_the_trained_tokenizer(cl100k_gguf, cl100k_read_back, text):
    tok, back = cl100k_gguf[0], cl100k_read_back
    ids = back.encode(text, allowed_special="all")
    assert ids == tok.encode(text, allowed_special="all")
    assert back.decode(ids) == text


def test_cl100k_gguf_reads_in_transformers_as_llama_bpe(cl100k_gguf):
    """transformers reads the file's vocabulary with the llama-bpe split it names: the same ids as ours
    for text that does not end in whitespace with a line break."""
    import transformers

    tok, path = cl100k_gguf
    theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in [*CODE[:3], "x = f3(2)\n\n    y", "tiny 'll and  fine\r\n!"]:
        assert theirs.encode(text, add_special_tokens=False) == tok.encode(text)


def test_gguf_without_the_pattern_key_reads_its_pre_name(tmp_path):
    """Files from llama.cpp (no scratchlm key) split as their tokenizer.ggml.pre says, as before."""
    path = _write_gguf(tmp_path / "l3.gguf", ["a", "b", "ab"], pre="llama-bpe", merges=["a b"])
    assert ByteLevelBPE.from_gguf(path).pattern == LLAMA3_PATTERN
