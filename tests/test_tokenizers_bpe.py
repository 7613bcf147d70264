"""Byte-level BPE on GPT-2's files: identical to tiktoken's gpt2 encoding, built offline."""

from __future__ import annotations

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import shared_path
from scratchlm.data.corpora import read_corpus
from scratchlm.errors import DataError, UserError
from scratchlm.tokenizers import ByteLevelBPE, load
from scratchlm.tokenizers.bpe import (
    _FAST_FORMS,
    GPT4_PATTERN,
    _merge_long,
    _merge_short,
    bytes_to_token,
    token_to_bytes,
)

# Text that exercises the split regex and the byte handling: any assigned Unicode character
# (Python's own Unicode database, so every engine agrees on its category), plus fragments that
# random characters rarely produce.
FRAGMENTS = [
    "'s", "'S", "'LL", "'ll", "'Re", "'ve", "'D", "'t", "'M", "ſ", "'ſ", " ", "  ", "   ", "\t", "\t\t", "\n",
    "\r\n", "\n\n", " \n ", "\r", "\x0b", "\x0c", "\x1c", "\x85", "\u00a0", "\u2028", "\u3000", "0", "123",
    " 42", "2024", "Ⅷ", "½", "٣", "👨\u200d👩\u200d👧", "👍🏽", "🇫🇷", "🧑\u200d💻", "漢字", "中文文本",
    "日本語のテキスト", "שלום", "مرحبا", "\u200f", "e\u0301", "a\u0308\u0323", "\u0301", "İ", "ǅ", "ß",
    "Hello", " world", "camelCase", "HTTPServer", "don't", "WE'LL", "<|endoftext|>", "<|im_start|>",
    "<|im_end|>", "<think>", "</s>", "<|", "|>",
    "...", "!!", " (", "--", "é", "\ufeff", "\U0001f600", "🙂",
]
CHARS = st.characters(exclude_categories=("Cs", "Cn"))
TEXT = st.lists(st.one_of(st.text(CHARS, max_size=6), st.sampled_from(FRAGMENTS)), max_size=24).map("".join)
PARITY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def gpt2() -> ByteLevelBPE:
    return load(shared_path("data", "gpt2", "encoder.json").parent)


@pytest.fixture(scope="module")
def tiktoken_gpt2():
    import tiktoken.load
    import tiktoken_ext.openai_public

    encoder_json = shared_path("data", "gpt2", "encoder.json")
    vocab_bpe = shared_path("data", "gpt2", "vocab.bpe")
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(vocab_bpe),
                                                           encoder_json_file=str(encoder_json))
    # tiktoken's own GPT-2 pattern (r50k), not ours
    return tiktoken.Encoding(name="gpt2", pat_str=tiktoken_ext.openai_public.r50k_pat_str,
                             mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256})


# ----- the book's oracles (Appendix A) ----------------------------------------------------------

def test_the_verdict_oracle_a1(gpt2):
    text = read_corpus("builtin:the-verdict")
    ids = gpt2.encode(text)
    assert len(text) == 20_479 and len(ids) == 5_145
    assert ids[:10] == [40, 367, 2885, 1464, 1807, 3619, 402, 271, 10899, 2138]
    assert gpt2.vocab_size == 50_257 and len(gpt2.merges) == 50_000


@pytest.mark.parametrize("text, expected", [
    ("Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace.",
     [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114, 286, 617, 34680,
      27271, 13]),
    ("Akwirw ier", [33901, 86, 343, 86, 220, 959]),
    ("Every effort moves you", [6109, 3626, 6100, 345]),
    ("Hello, I am", [15496, 11, 314, 716]),
])
def test_gpt2_oracles_a3(gpt2, text, expected):
    assert gpt2.encode(text, allowed_special={"<|endoftext|>"}) == expected
    assert gpt2.decode(expected) == text


# ----- parity with tiktoken ---------------------------------------------------------------------

@pytest.mark.parametrize("corpus", ["builtin:the-verdict", "builtin:tinyshakespeare"])
def test_corpora_match_tiktoken(gpt2, tiktoken_gpt2, corpus):
    text = read_corpus(corpus)
    ids = gpt2.encode(text)
    assert ids == tiktoken_gpt2.encode(text)
    assert gpt2.decode(ids) == text


@PARITY
@given(text=TEXT)
def test_any_text_matches_tiktoken(gpt2, tiktoken_gpt2, text):
    ids = gpt2.encode(text, allowed_special="all")
    assert ids == tiktoken_gpt2.encode(text, allowed_special="all")
    assert gpt2.encode(text, disallowed_special=()) == tiktoken_gpt2.encode(text, disallowed_special=())
    assert gpt2.decode(gpt2.encode_ordinary(text)) == text


@PARITY
@given(text=st.text(st.sampled_from("ab漢😀' \t"), min_size=150, max_size=600))
def test_long_pieces_match_tiktoken(gpt2, tiktoken_gpt2, text):
    # Long pieces take the heap merge; it must give what the simple loop (and tiktoken) give.
    assert gpt2.encode_ordinary(text) == tiktoken_gpt2.encode_ordinary(text)


@PARITY
@given(data=st.binary(min_size=2, max_size=120))
def test_heap_merge_equals_simple_merge(gpt2, data):
    symbols = [bytes([b]) for b in data]
    assert _merge_long(list(symbols), gpt2._ranks) == _merge_short(list(symbols), gpt2._ranks)


@PARITY
@given(text=TEXT)
def test_reordered_patterns_split_identically(text):
    for pattern, fast in _FAST_FORMS.items():
        assert regex.findall(fast, text) == regex.findall(pattern, text)


def test_every_gpt2_token_decodes_like_tiktoken(gpt2, tiktoken_gpt2):
    """Our decoder against tiktoken's (which reads the same two files its own way), every id."""
    for i in range(tiktoken_gpt2.n_vocab):
        token = tiktoken_gpt2.decode_single_token_bytes(i)
        assert gpt2.decode_bytes([i]) == token, i
        assert token_to_bytes(bytes_to_token(token)) == token


TIKTOKEN_CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)


@pytest.fixture(scope="module")
def gpt4_split_pair(gpt2, tiktoken_gpt2):
    """GPT-2's merges under GPT-4's split rule, in our engine and in tiktoken's."""
    import tiktoken

    ours = ByteLevelBPE(gpt2.encoder, gpt2.merges, {}, GPT4_PATTERN)
    theirs = tiktoken.Encoding(name="gpt2-cl100k-split", pat_str=TIKTOKEN_CL100K_PATTERN,
                               mergeable_ranks=tiktoken_gpt2._mergeable_ranks, special_tokens={})
    return ours, theirs


@PARITY
@given(text=TEXT)
def test_gpt4_pattern_splits_like_tiktoken_cl100k(gpt4_split_pair, text):
    ours, theirs = gpt4_split_pair
    assert ours.encode_ordinary(text) == theirs.encode_ordinary(text)


# ----- special tokens: tiktoken's rules ---------------------------------------------------------

def test_disallowed_special_raises_like_tiktoken(gpt2, tiktoken_gpt2):
    text = "end<|endoftext|>start"
    with pytest.raises(ValueError):
        tiktoken_gpt2.encode(text)
    with pytest.raises(UserError, match="special token '<\\|endoftext\\|>'.*allowed_special"):
        gpt2.encode(text)
    choices = ({"allowed_special": "all"}, {"allowed_special": {"<|endoftext|>"}}, {"disallowed_special": ()})
    for kwargs in choices:
        assert gpt2.encode(text, **kwargs) == tiktoken_gpt2.encode(text, **kwargs)
    assert 50256 in gpt2.encode(text, allowed_special="all")
    assert 50256 not in gpt2.encode(text, disallowed_special=())


def test_unknown_special_names_are_errors(gpt2):
    with pytest.raises(UserError, match="not a special token"):
        gpt2.encode("x", allowed_special={"<|im_end|>"})
    with pytest.raises(UserError, match="'all' or a set"):
        gpt2.encode("x", allowed_special="<|endoftext|>")


def test_lookups(gpt2):
    assert gpt2.eos_id == 50256 and gpt2.bos_id is None
    assert gpt2.token_to_id("<|endoftext|>") == 50256 and gpt2.token_to_id(" the") == 262
    assert gpt2.special_tokens == {"<|endoftext|>": 50256}
    assert gpt2.chat_template is None
    with pytest.raises(UserError, match="not a token"):
        gpt2.token_to_id("<|im_start|>")


def test_decode_rejects_bad_ids(gpt2):
    for bad in ([50257], [-1], [1, 2, 10**9]):
        with pytest.raises(UserError, match="not in the gpt2 vocabulary"):
            gpt2.decode(bad)


# ----- streaming ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["Hi 👨‍👩‍👧 and 🇫🇷!", "中文文本 日本語のテキスト", "e\u0301 ✓ 🧑‍💻 done"])
def test_stream_decoder_never_breaks_a_character(gpt2, text):
    ids = gpt2.encode(text)
    assert any("\ufffd" in gpt2.decode([i]) for i in ids), "the text should split a character across tokens"
    stream = gpt2.stream_decoder()
    pieces = [stream.add(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stream_decoder_flushes_incomplete_bytes(gpt2):
    ids = gpt2.encode("😀")
    stream = gpt2.stream_decoder()
    assert "".join(stream.add(i) for i in ids[:-1]) == ""
    assert stream.flush() == gpt2.decode(ids[:-1]) == "\ufffd"


# ----- saving as tokenizer.json ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_gpt2(gpt2, tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt2-saved")
    gpt2.save(directory)
    return directory


def test_saved_tokenizer_json_loads_back(gpt2, saved_gpt2):
    again = load(saved_gpt2)
    assert isinstance(again, ByteLevelBPE)
    assert (again.encoder, again.merges, again.special_tokens, again.eos_id) == (
        gpt2.encoder, gpt2.merges, gpt2.special_tokens, 50256)
    text = read_corpus("builtin:the-verdict")
    assert again.encode(text) == gpt2.encode(text)


@PARITY
@given(text=TEXT)
def test_saved_tokenizer_json_encodes_like_hf_tokenizers(gpt2, saved_gpt2, text):
    hf = _hf_tokenizer(saved_gpt2 / "tokenizer.json")
    assert gpt2.encode(text, allowed_special="all") == hf.encode(text, add_special_tokens=False).ids


def _hf_tokenizer(path, _cache={}):  # noqa: B006 - a per-process cache of parsed files
    import tokenizers
    if str(path) not in _cache:
        _cache[str(path)] = tokenizers.Tokenizer.from_file(str(path))
    return _cache[str(path)]


# ----- bad files ------------------------------------------------------------------------------------

def _copy_gpt2(gpt2_files, tmp_path):
    encoder_json, vocab_bpe = gpt2_files
    (tmp_path / "encoder.json").write_bytes(encoder_json.read_bytes())
    (tmp_path / "vocab.bpe").write_bytes(vocab_bpe.read_bytes())
    return tmp_path / "encoder.json", tmp_path / "vocab.bpe"


def test_missing_vocab_bpe(gpt2_files, tmp_path):
    _, vocab_bpe = _copy_gpt2(gpt2_files, tmp_path)
    vocab_bpe.unlink()
    with pytest.raises(DataError, match="vocab.bpe not found"):
        load(tmp_path)


def test_malformed_encoder_json(gpt2_files, tmp_path):
    encoder_json, _ = _copy_gpt2(gpt2_files, tmp_path)
    encoder_json.write_text('{"a": 1,', encoding="utf-8")
    with pytest.raises(DataError, match="encoder.json is not valid JSON"):
        load(tmp_path)
    encoder_json.write_text('{"a": "x"}', encoding="utf-8")
    with pytest.raises(DataError, match="encoder.json.*not a non-negative integer"):
        load(tmp_path)


def test_malformed_vocab_bpe(gpt2_files, tmp_path):
    _, vocab_bpe = _copy_gpt2(gpt2_files, tmp_path)
    vocab_bpe.write_text("#version: 0.2\nĠ t\nthree parts here\n", encoding="utf-8")
    with pytest.raises(DataError, match="vocab.bpe: merge 2 .* is not two byte-level tokens"):
        load(tmp_path)
    vocab_bpe.write_text("#version: 0.2\nĠ t\nzzzz qqqq\n", encoding="utf-8")
    with pytest.raises(DataError, match="merge 2 .* not in the vocabulary"):
        load(tmp_path)


def test_missing_tokenizer(tmp_path):
    with pytest.raises(DataError, match="tokenizer not found"):
        load(tmp_path / "nope")
    with pytest.raises(DataError, match="holds no tokenizer"):
        load(tmp_path)
