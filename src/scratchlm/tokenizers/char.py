"""Character-level tokenizer (nanoGPT's shakespeare_char): one id per character of a fixed set.

The vocabulary is the sorted set of characters of a training text, so ids are stable for a
given text; optional special tokens (e.g. ``<|endoftext|>``) get the ids after the characters.
A character outside the set is an error, not a silent ``<unk>``: a character model cannot
represent it, and silently dropping text would corrupt training data.
"""

from __future__ import annotations

from collections.abc import Iterable

from scratchlm.errors import DataError, UserError
from scratchlm.tokenizers.base import ListVocabTokenizer


class CharTokenizer(ListVocabTokenizer):
    """``chars[i]`` has id ``i``; specials follow."""

    name = "char"

    def __init__(self, chars: Iterable[str], special_tokens: dict[str, int] | Iterable[str] = ()):
        self.chars = list(chars)
        if any(len(c) != 1 for c in self.chars) or len(set(self.chars)) != len(self.chars):
            raise DataError("a character vocabulary must list distinct single characters",
                            "build it with CharTokenizer.from_text(text)")
        if not isinstance(special_tokens, dict):
            special_tokens = {name: len(self.chars) + k for k, name in enumerate(special_tokens)}
        eos = "<|endoftext|>" if "<|endoftext|>" in special_tokens else None
        super().__init__(special_tokens, eos_token=eos)
        self._ids = {c: i for i, c in enumerate(self.chars)}
        size = max([len(self.chars) - 1, *self.special_tokens.values()]) + 1
        self._bytes = [c.encode("utf-8") for c in self.chars] + [b""] * (size - len(self.chars))
        for token, i in self.special_tokens.items():
            self._bytes[i] = token.encode("utf-8")

    @classmethod
    def from_text(cls, text: str, special_tokens: Iterable[str] = ()) -> CharTokenizer:
        """Vocabulary = ``sorted(set(text))``, then ``special_tokens`` in the order given."""
        if not text:
            raise DataError("cannot build a character vocabulary from an empty text", "pass a non-empty text")
        return cls(sorted(set(text)), list(special_tokens))

    def encode_ordinary(self, text: str) -> list[int]:
        ids = self._ids
        try:
            return [ids[c] for c in text]
        except KeyError as err:
            char = err.args[0]
            position = text.index(char)
            raise UserError(
                f"character {char!r} (U+{ord(char):04X}, at position {position}) is not in the "
                f"{len(self.chars)}-character vocabulary",
                "build the tokenizer from a text that contains it, or remove it from the input",
            ) from None

    def decode(self, ids) -> str:
        # Every token is whole characters, so the bytes always decode cleanly.
        ids = list(ids)
        try:
            if ids and min(ids) < 0:
                raise IndexError(min(ids))
            return b"".join([self._bytes[i] for i in ids]).decode("utf-8")
        except (IndexError, TypeError) as err:
            raise self._bad_id_error(ids) from err

    def token_bytes(self, token_id: int) -> bytes:
        if not isinstance(token_id, int) or token_id < 0:
            raise IndexError(token_id)
        return self._bytes[token_id]

    @property
    def vocab_size(self) -> int:
        return len(self._bytes)
