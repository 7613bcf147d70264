"""The word tokenizer (Raschka ch. 2, oracle A2) and the character tokenizer."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlm.data.corpora import read_corpus
from scratchlm.errors import DataError, UserError
from scratchlm.tokenizers import CharTokenizer, RegexWordTokenizer, load
from scratchlm.tokenizers.word import split_words


@pytest.fixture(scope="module")
def word() -> RegexWordTokenizer:
    return RegexWordTokenizer.from_text(read_corpus("builtin:the-verdict"))


def test_vocabulary_oracle_a2(word):
    assert len(split_words(read_corpus("builtin:the-verdict"))) == 4_690
    assert len(word.vocab) == 1_130 and word.vocab_size == 1_132
    assert word.special_tokens == {"<|endoftext|>": 1130, "<|unk|>": 1131}
    assert word.eos_id == 1130 and word.vocab[:3] == ["!", '"', "'"]


def test_encode_decode_as_the_book(word):
    text = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of the palace."
    ids = word.encode(text, allowed_special="all")
    assert ids == [1131, 5, 355, 1126, 628, 975, 10, 1130, 55, 988, 956, 984, 722, 988, 1131, 7]
    expected = "<|unk|>, do you like tea? <|endoftext|> In the sunlit terraces of the <|unk|>."
    assert word.decode(ids) == expected
    with pytest.raises(UserError, match="special token '<\\|endoftext\\|>'"):
        word.encode(text)


def test_decode_rejoins_punctuation(word):
    text = '"It\'s the last he painted, you know," Mrs. Gisburn said with pardonable pride.'
    ids = word.encode(text)
    expected = '" It\' s the last he painted, you know," Mrs. Gisburn said with pardonable pride.'
    assert word.decode(ids) == expected
    stream = word.stream_decoder()
    assert "".join([stream.add(i) for i in ids] + [stream.flush()]) == word.decode(ids)


def test_word_save_load(word, tmp_path):
    word.save(tmp_path)
    payload = json.loads((tmp_path / "scratchlm-tokenizer.json").read_text(encoding="utf-8"))
    assert payload["format"] == "scratchlm-tokenizer" and payload["type"] == "word"
    again = load(tmp_path)
    assert isinstance(again, RegexWordTokenizer) and again.vocab == word.vocab
    assert again.special_tokens == word.special_tokens and again.eos_id == 1130
    assert again.token_to_id("Gisburn") == word.token_to_id("Gisburn")


@pytest.fixture(scope="module")
def char() -> CharTokenizer:
    return CharTokenizer.from_text(read_corpus("builtin:tinyshakespeare"), special_tokens=["<|endoftext|>"])


def test_char_vocabulary_as_nanogpt(char):
    text = read_corpus("builtin:tinyshakespeare")
    assert char.chars == sorted(set(text)) and len(char.chars) == 65
    assert char.vocab_size == 66 and char.eos_id == 65
    assert char.encode("hii there") == [46, 47, 47, 1, 58, 46, 43, 56, 43]
    assert char.encode("a<|endoftext|>", allowed_special="all") == [39, 65]


@settings(max_examples=200, deadline=None)
@given(text=st.text(st.sampled_from(sorted(set(read_corpus("builtin:tinyshakespeare"))))))
def test_char_round_trip(char, text):
    assert char.decode(char.encode(text)) == text


def test_char_unknown_character_is_a_clear_error(char):
    with pytest.raises(UserError, match=r"character '€' \(U\+20AC, at position 4\) is not in the 65-char"):
        char.encode("cost€")
    with pytest.raises(UserError, match="not in the char vocabulary"):
        char.decode([66])
    with pytest.raises(DataError, match="empty text"):
        CharTokenizer.from_text("")


def test_char_save_load_and_stream(char, tmp_path):
    char.save(tmp_path)
    again = load(tmp_path / "scratchlm-tokenizer.json")
    assert isinstance(again, CharTokenizer) and again.chars == char.chars
    assert again.special_tokens == {"<|endoftext|>": 65}
    stream = again.stream_decoder()
    assert "".join(stream.add(i) for i in again.encode("To be")) == "To be"


def test_damaged_saved_file(tmp_path):
    damaged = {"format": "scratchlm-tokenizer", "type": "char", "vocab": ["a", 3]}
    (tmp_path / "scratchlm-tokenizer.json").write_text(json.dumps(damaged), encoding="utf-8")
    with pytest.raises(DataError, match="'vocab' must be a list of strings"):
        load(tmp_path)
    (tmp_path / "scratchlm-tokenizer.json").write_text('{"format": "other"}', encoding="utf-8")
    with pytest.raises(DataError, match="not a scratchlm tokenizer file"):
        load(tmp_path)
