"""Raschka's chapter-2 word tokenizer: split on punctuation and whitespace, look words up.

The vocabulary is the sorted set of pieces of one text, then ``<|endoftext|>`` and ``<|unk|>``
(so on the-verdict: 1,130 words + 2 = 1,132).  A word outside the vocabulary becomes ``<|unk|>``;
decoding joins words with spaces and removes the space before punctuation, as the book does,
so ``decode(encode(x))`` normalises whitespace rather than reproducing ``x``.
"""

from __future__ import annotations

import re

from scratchlm.errors import DataError
from scratchlm.tokenizers.base import ListVocabTokenizer, StreamDecoder

SPLIT = re.compile(r'([,.:;?_!"()\']|--|\s)')
NO_SPACE_BEFORE = re.compile(r'\s+([,.?!"()\'])')
ENDOFTEXT, UNK = "<|endoftext|>", "<|unk|>"


def split_words(text: str) -> list[str]:
    """The book's pieces: punctuation and ``--`` kept as words, whitespace dropped."""
    return [piece for piece in SPLIT.split(text) if piece.strip()]


class RegexWordTokenizer(ListVocabTokenizer):
    """Words from a fixed vocabulary; unknown words map to ``<|unk|>``."""

    name = "word"

    def __init__(self, vocab: list[str], special_tokens: dict[str, int] | None = None):
        if special_tokens is None:
            special_tokens = {ENDOFTEXT: len(vocab), UNK: len(vocab) + 1}
        super().__init__(special_tokens, eos_token=ENDOFTEXT if ENDOFTEXT in special_tokens else None)
        if UNK not in self.special_tokens:
            raise DataError("a word tokenizer needs an <|unk|> special token",
                            "build it with RegexWordTokenizer.from_text(text)")
        self.vocab = list(vocab)
        self._ids = {word: i for i, word in enumerate(self.vocab)}
        self._tokens = self.vocab + [""] * (max(self.special_tokens.values()) + 1 - len(self.vocab))
        for token, i in self.special_tokens.items():
            self._tokens[i] = token
        self._unk = self.special_tokens[UNK]

    @classmethod
    def from_text(cls, text: str) -> RegexWordTokenizer:
        """Vocabulary = the sorted unique pieces of ``text`` (the book's ``sorted(set(...))``)."""
        words = sorted(set(split_words(text)) - {ENDOFTEXT, UNK})
        if not words:
            raise DataError("the text has no words to build a vocabulary from", "pass a non-empty text")
        return cls(words)

    def encode_ordinary(self, text: str) -> list[int]:
        ids, unk = self._ids, self._unk
        return [ids.get(word, unk) for word in split_words(text)]

    def decode(self, ids) -> str:
        words = [self._word(i) for i in ids]
        return NO_SPACE_BEFORE.sub(r"\1", " ".join(words))

    def token_bytes(self, token_id: int) -> bytes:
        return self._word(token_id).encode("utf-8")

    def stream_decoder(self) -> StreamDecoder:
        return _WordStream(self)

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    def _word(self, token_id: int) -> str:
        if not isinstance(token_id, int) or not 0 <= token_id < len(self._tokens):
            raise self._bad_id_error([token_id])
        return self._tokens[token_id]


class _WordStream(StreamDecoder):
    """Streams the book's decode: a space before each word except the first and punctuation."""

    def __init__(self, tokenizer: RegexWordTokenizer):
        self._tokenizer = tokenizer
        self._started = False

    def add(self, token_id: int) -> str:
        word = self._tokenizer._word(token_id)
        glue = "" if not self._started or NO_SPACE_BEFORE.fullmatch(" " + word) else " "
        self._started = True
        return glue + word

    def flush(self) -> str:
        return ""
