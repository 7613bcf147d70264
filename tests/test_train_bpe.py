"""The BPE trainer: incremental == naive reference, == the ``tokenizers`` trainer, and its output
loads in ``tokenizers`` and encodes exactly as we do."""

from __future__ import annotations

import json
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scratchlm.data.corpora import read_corpus
from scratchlm.errors import ConfigError, DataError
from scratchlm.tokenizers.bpe import GPT2_PATTERN, GPT4_PATTERN, bytes_to_token
from scratchlm.tokenizers.train_bpe import (
    build_encoder,
    count_words,
    learn_merges,
    learn_merges_reference,
    train_bpe,
    train_bpe_from_corpus,
)

EOT = "<|endoftext|>"
VERDICT = read_corpus("builtin:the-verdict")


def _both(word_counts: dict[bytes, int], num_tokens: int) -> list[tuple[bytes, bytes]]:
    """Merges from the incremental trainer, checked equal to the naive reference's."""
    fast = learn_merges(word_counts, num_tokens)
    assert fast == learn_merges_reference(word_counts, num_tokens)
    return fast


# ----- incremental == naive --------------------------------------------------------------------

@pytest.mark.parametrize("pattern", [GPT2_PATTERN, GPT4_PATTERN], ids=["gpt2", "gpt4"])
def test_incremental_equals_reference_on_the_verdict(pattern):
    words = count_words(VERDICT[:6000], pattern)
    merges = _both(words, 256 + 150)
    assert len(merges) == 150


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=st.sampled_from(list("aab  bc\n\t'sTé😀中́")), max_size=300),
       st.integers(min_value=256, max_value=300))
def test_incremental_equals_reference_on_generated_text(text, num_tokens):
    _both(count_words(text, GPT4_PATTERN), num_tokens)


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=120), st.sampled_from([GPT2_PATTERN, GPT4_PATTERN]))
def test_incremental_equals_reference_on_any_unicode(text, pattern):
    _both(count_words(text, pattern), 256 + 40)


@settings(max_examples=80, deadline=None)
@given(st.dictionaries(st.lists(st.sampled_from([0, 97, 98, 99, 255]), min_size=1, max_size=12).map(bytes),
                       st.integers(min_value=1, max_value=9), max_size=12))
def test_incremental_equals_reference_on_word_counts(word_counts):
    """Words over 5 bytes: runs of one byte (overlapping pairs), many ties, frequencies != 1."""
    merges = _both(word_counts, 256 + 60)
    encoder = build_encoder(merges)
    assert len(encoder) == 256 + len({left + right for left, right in merges})
    assert all(left in encoder and right in encoder for left, right in merges)


# ----- the same merges as the tokenizers trainer ------------------------------------------------

def test_same_merges_as_tokenizers_trainer():
    """Same words (GPT-2 split, texts cut at the special token) -> same merges, in the same order.

    On this 24 kB text the later merges are of pairs seen 9 to 13 times, with dozens of pairs tied
    at each count, so this checks the tie-breaking rule, not only the counting."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    text = VERDICT + EOT + VERDICT[:3000]
    vocab_size = 256 + 1 + 300
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(text.split(EOT), trainer)  # split as we do: specials are never merged across
    hf_merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                 for m in json.loads(hf.to_str())["model"]["merges"]]

    ours = train_bpe(text, vocab_size, pattern=GPT2_PATTERN)
    assert [(bytes_to_token(a), bytes_to_token(b)) for a, b in ours.merges] == hf_merges


# ----- the trained tokenizer in tokenizers ------------------------------------------------------

@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_saved_tokenizer_loads_in_tokenizers_and_encodes_the_same(tmp_path, pattern):
    from tokenizers import Tokenizer

    train_text = read_corpus("builtin:tinyshakespeare")[:150_000]
    tok = train_bpe(train_text, 600, pattern=pattern)
    tok.save(tmp_path)
    hf = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert hf.get_vocab_size() == tok.vocab_size == 600

    held_out = [
        VERDICT,
        f"Hello{EOT}world {EOT}\n\n  tabs\tand CRLF\r\nend",
        "Émoji 👍🏽 and ZWJ 👨‍👩‍👧, 中文, עברית, e\u0301, 12345 678, I'M you'LL   spaces   ",
    ]
    for text in held_out:
        ids = tok.encode(text, allowed_special="all")
        assert ids == hf.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
        assert hf.decode(ids, skip_special_tokens=False) == text
    assert tok.encode(EOT, allowed_special="all") == [599]


# ----- sizes, stops and errors ------------------------------------------------------------------

def test_vocab_size_below_minimum_is_a_config_error():
    with pytest.raises(ConfigError, match="minimum 257") as err:
        train_bpe("hello world", 256)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="minimum 258"):
        train_bpe("hello world", 257, special_tokens=[EOT, "<|pad|>"])


def test_minimum_vocab_size_learns_no_merge():
    tok = train_bpe(VERDICT, 257)
    assert tok.merges == [] and tok.vocab_size == 257
    assert tok.special_tokens == {EOT: 256}
    assert tok.decode(tok.encode("héllo")) == "héllo"
    assert len(tok.encode("héllo")) == len("héllo".encode())


def test_requested_size_is_reached():
    tok = train_bpe(VERDICT, 256 + 1 + 200)
    assert tok.vocab_size == 457 and len(tok.merges) == 200
    assert tok.special_tokens == {EOT: 456}


def test_running_out_of_pairs_stops_with_a_warning():
    # Words "ab", " ab", " cd": after 4 merges each is one token and no pair is left.  The tie
    # between (c, d) and (" ", ab) goes to the smaller ids: letters come before the space byte.
    with pytest.warns(UserWarning, match="ran out of pairs"):
        tok = train_bpe("ab ab cd", 400)
    assert tok.merges == [(b"a", b"b"), (b"c", b"d"), (b" ", b"ab"), (b" ", b"cd")]
    assert tok.vocab_size == 256 + 4 + 1
    assert tok.encode("ab ab cd") == [256, 258, 259]


def test_special_tokens_are_never_merged_across():
    # Unsplit, "<|", "pad", ... would be frequent pairs; split, only "hello" is left, and its four
    # pairs tie at 40: the smallest ids win ("e" < "h" < "l" < "o" < merged tokens).
    text = ("hello" + EOT + "<|pad|>") * 40
    tok = train_bpe(text, 256 + 2 + 4, special_tokens=[EOT, "<|pad|>"])
    assert tok.merges == [(b"e", b"l"), (b"h", b"el"), (b"l", b"o"), (b"hel", b"lo")]
    assert tok.special_tokens == {EOT: len(tok.encoder), "<|pad|>": len(tok.encoder) + 1}
    assert count_words("a<|endoftext|>b", GPT4_PATTERN) == {b"a": 1, b"b": 1}


def test_empty_corpus_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="empty"):
        train_bpe("", 300)
    with pytest.raises(DataError, match="empty"):
        train_bpe(EOT * 3, 300)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        train_bpe_from_corpus(str(tmp_path / "empty.txt"), 300)


def test_pattern_names_and_bad_patterns():
    with pytest.raises(ConfigError, match="unknown split pattern 'gpt3'"):
        train_bpe("hello", 300, pattern="gpt3")
    with pytest.raises(ConfigError, match="invalid split pattern"):
        train_bpe("hello", 300, pattern=r"(\p{L}+")
    assert train_bpe(VERDICT[:2000], 300, pattern="GPT2").merges == \
        train_bpe(VERDICT[:2000], 300, pattern=GPT2_PATTERN).merges


def test_one_resolve_pattern_strict_for_people_verbatim_for_files():
    from scratchlm.tokenizers.bpe import PATTERNS, ByteLevelBPE, resolve_pattern

    for strict in (True, False):
        assert resolve_pattern("gpt4", strict=strict) == PATTERNS["gpt4"]
        assert resolve_pattern(r"\s+|\S+", strict=strict) == r"\s+|\S+"
    assert resolve_pattern(" GPT2 ", strict=True) == PATTERNS["gpt2"]  # a person's spelling
    with pytest.raises(ConfigError, match="unknown split pattern 'gpt3'"):
        resolve_pattern("gpt3", strict=True)
    # A tokenizer file's Split on the literal String "ab" is the regex "ab": taken as is.
    assert resolve_pattern("ab", strict=False) == "ab"
    tok = ByteLevelBPE({bytes([b]): i for i, b in enumerate(range(256))}, [], {}, "ab", "test")
    assert tok.pattern == "ab"


def test_from_corpus_with_progress_bar(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok = train_bpe_from_corpus("builtin:the-verdict", 400, pattern="gpt2", progress=True)
    assert tok.vocab_size == 400
    assert "BPE merges" in capsys.readouterr().err
    assert tok.merges == train_bpe(VERDICT, 400, pattern="gpt2").merges  # deterministic


def test_several_texts_are_not_joined():
    # As two texts, "ab" and "c" never become "abc"; as one text "abc" is one word.
    split = count_words(["ab", "c"] * 3, GPT4_PATTERN)
    assert split == {b"ab": 3, b"c": 3}
    assert count_words("abc", GPT4_PATTERN) == {b"abc": 1}
