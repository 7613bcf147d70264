"""The one tokenizer interface, shared by the word, character and byte-level BPE tokenizers.

The base class owns everything that does not depend on how ordinary text becomes ids: special
tokens with tiktoken's ``allowed_special`` / ``disallowed_special`` rules, the eos/bos lookups and
the streaming decoder.  A subclass supplies ``encode_ordinary`` (text without special tokens),
``token_bytes`` (what one id spells), ``vocab_size``, ``save`` and, when it needs, ``decode``.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from scratchlm.checkpoint.atomic import write_json_atomic
from scratchlm.errors import DataError, UserError


class StreamDecoder:
    """Turns ids into text one at a time, holding back the bytes of an unfinished character.

    A byte-level token can end in the middle of a UTF-8 sequence (an emoji is often two or three
    tokens); printing it at once would show a replacement character that later text cannot undo.
    The incremental UTF-8 decoder keeps those bytes until the character completes, so the pieces
    returned by ``add`` and ``flush`` always join to exactly ``decode(ids)``.
    """

    def __init__(self, token_bytes: Callable[[int], bytes]):
        self._token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        """The text that ``token_id`` completes (possibly ``""`` while a character is unfinished)."""
        return self._utf8.decode(self._token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is still held back, at the end of the stream (broken bytes become U+FFFD)."""
        return self._utf8.decode(b"", final=True)


class Tokenizer:
    """Text <-> ids.  ``special_tokens`` maps names such as ``<|endoftext|>`` to their ids.

    ``chat_template`` is the Jinja template shipped with the vocabulary (``tokenizer_config.json``
    or the GGUF ``tokenizer.chat_template``) when there is one.  ``eos_token`` / ``bos_token`` are
    special-token names; ``eos_id`` / ``bos_id`` resolve them.
    """

    name: str = "tokenizer"

    def __init__(
        self,
        special_tokens: dict[str, int] | None = None,
        *,
        eos_token: str | None = None,
        bos_token: str | None = None,
        chat_template: str | None = None,
    ):
        self.special_tokens: dict[str, int] = dict(special_tokens or {})
        self.eos_token = eos_token
        self.bos_token = bos_token
        self.chat_template = chat_template
        self._special_regexes: dict[frozenset[str], re.Pattern[str] | None] = {}

    # ----- what a subclass provides -----------------------------------------------------------

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of ``text`` with every special-token string treated as plain text."""
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes that one id stands for."""
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def save(self, directory: str | Path) -> None:
        raise NotImplementedError

    def _lookup(self, token: str) -> int | None:
        """The id of an ordinary vocabulary entry spelled ``token``, or None."""
        return None

    # ----- shared behaviour -------------------------------------------------------------------

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; bytes that are not valid UTF-8 become U+FFFD (as tiktoken does)."""
        ids = list(ids)
        try:
            data = b"".join([self.token_bytes(i) for i in ids])
        except (IndexError, KeyError, TypeError) as err:
            raise self._bad_id_error(ids) from err
        return data.decode("utf-8", errors="replace")

    def encode(
        self,
        text: str,
        allowed_special: set[str] | frozenset[str] | str = frozenset(),
        disallowed_special: set[str] | frozenset[str] | str = "all",
    ) -> list[int]:
        """Ids of ``text``.  Special-token strings follow tiktoken's rules.

        ``allowed_special`` (a set of names, or ``"all"``) are encoded as their special ids.  A
        ``disallowed_special`` string found in the text (``"all"``: every special not allowed) is
        an error, because text from a user should not be able to forge a control token by accident.
        Pass ``disallowed_special=()`` to encode such strings as ordinary text instead.
        """
        allowed = self._names(allowed_special, "allowed_special")
        disallowed = self._names(disallowed_special, "disallowed_special")
        if disallowed_special == "all":
            disallowed = disallowed - allowed
        if disallowed:
            found = self._special_regex(disallowed)
            match = found.search(text) if found else None
            if match:
                token = match.group(0)
                raise UserError(
                    f"the text contains the special token {token!r}, which is not allowed here",
                    f"pass allowed_special={{{token!r}}} (or 'all'; CLI: --allowed-special all) to encode it "
                    "as the special token, or disallowed_special=() to encode it as plain text",
                )
        parts = list(self._split_on_specials(text, allowed))
        if len(parts) == 1:  # no special token in the text: skip copying the ids
            return self.encode_ordinary(text) if text else []
        ids: list[int] = []
        for chunk, special_id in parts:
            if special_id is not None:
                ids.append(special_id)
            elif chunk:
                ids.extend(self.encode_ordinary(chunk))
        return ids

    def token_to_id(self, name: str) -> int:
        """The id of a special token, or of an ordinary token spelled exactly ``name``."""
        if name in self.special_tokens:
            return self.special_tokens[name]
        found = self._lookup(name)
        if found is None:
            specials = ", ".join(sorted(self.special_tokens)) or "none"
            raise UserError(f"{name!r} is not a token of the {self.name} tokenizer",
                            f"its special tokens are: {specials}")
        return found

    @property
    def eos_id(self) -> int | None:
        """Id of the end-of-sequence token (e.g. ``<|endoftext|>``, ``<|im_end|>``), if any."""
        return self.special_tokens.get(self.eos_token) if self.eos_token else None

    @property
    def bos_id(self) -> int | None:
        """Id of the beginning-of-sequence token, if the vocabulary names one."""
        return self.special_tokens.get(self.bos_token) if self.bos_token else None

    def stream_decoder(self) -> StreamDecoder:
        """A decoder for ids arriving one by one (generation), never showing half a character."""
        return StreamDecoder(self._checked_token_bytes)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"

    # ----- helpers ----------------------------------------------------------------------------

    def _always_split(self) -> frozenset[str]:
        """Strings always cut out of the text whatever ``allowed_special`` says (none by default)."""
        return frozenset()

    def _names(self, value: set[str] | frozenset[str] | str | Iterable[str], what: str) -> frozenset[str]:
        if value == "all":
            return frozenset(self.special_tokens)
        if isinstance(value, str):
            raise UserError(f"{what} must be 'all' or a set of special-token names, not the string {value!r}",
                            f"pass {{{value!r}}} for one token")
        names = frozenset(value)
        unknown = sorted(names - set(self.special_tokens))
        if unknown:
            raise UserError(f"{what} names {', '.join(map(repr, unknown))}, "
                            "not a special token of this tokenizer",
                            f"its special tokens are: {', '.join(sorted(self.special_tokens)) or 'none'}")
        return names

    def _special_regex(self, names: frozenset[str]) -> re.Pattern[str] | None:
        """One alternation over ``names``, longest first, so the longest special token wins."""
        if names not in self._special_regexes:
            alternatives = [self._special_alternative(n) for n in sorted(names, key=lambda n: (-len(n), n))]
            self._special_regexes[names] = re.compile("|".join(alternatives)) if alternatives else None
        return self._special_regexes[names]

    def _special_alternative(self, name: str) -> str:
        return re.escape(name)

    def _special_id(self, matched: str) -> int:
        return self.special_tokens[matched]

    def _split_on_specials(self, text: str, allowed: frozenset[str]) -> Iterator[tuple[str, int | None]]:
        """``(chunk, None)`` for ordinary text and ``(token, id)`` for each special token found."""
        regex = self._special_regex(allowed | self._always_split())
        if regex is None:
            yield text, None
            return
        start = 0
        for match in regex.finditer(text):
            yield text[start:match.start()], None
            yield match.group(0), self._special_id(match.group(0))
            start = match.end()
        yield text[start:], None

    def _checked_token_bytes(self, token_id: int) -> bytes:
        try:
            return self.token_bytes(token_id)
        except (IndexError, KeyError, TypeError) as err:
            raise self._bad_id_error([token_id]) from err

    def _bad_id_error(self, ids: Iterable[int]) -> UserError:
        for i in ids:
            try:
                self.token_bytes(i)
            except (IndexError, KeyError, TypeError):
                return UserError(f"token id {i!r} is not in the {self.name} vocabulary "
                                 f"(size {self.vocab_size})",
                                 "decode ids produced by this same tokenizer")
        return UserError("cannot decode these ids", "decode ids produced by this same tokenizer")


def read_json(path: Path, what: str) -> object:
    """Parse a JSON file; a missing or malformed one is a one-line ``DataError`` naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path} not found", f"{what} is needed here; check the path") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {path}: {err}", f"{what} must be a readable UTF-8 JSON file") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})",
                        f"{what} looks damaged; restore or re-download it") from None


# ----- the scratchlm-tokenizer.json format (word and character tokenizers) ----------------------
#
# {"format": "scratchlm-tokenizer", "version": 1, "type": "word" | "char",
#  "vocab": [token 0, token 1, ...],              ordinary tokens in id order
#  "special_tokens": {"<|endoftext|>": 1130, ...}, name -> id (ids may follow the vocab)
#  "eos_token": str | null, "bos_token": str | null, "chat_template": str | null}
#
# Plain JSON, never pickle: a tokenizer file must be safe to open and readable by eye.

SAVED_FILE = "scratchlm-tokenizer.json"
SAVED_FORMAT = "scratchlm-tokenizer"


class ListVocabTokenizer(Tokenizer):
    """Base of the word and char tokenizers: ordinary tokens are a list of strings, id = position.

    A subclass fills ``_ids`` (token → id, in vocabulary order) and takes ``(vocab, special_tokens)``
    in its constructor; saving and loading that list as JSON lives here, once.
    """

    _ids: dict[str, int]

    def _lookup(self, token: str) -> int | None:
        return self._ids.get(token)

    def save(self, directory: str | Path) -> None:
        """Write ``directory/scratchlm-tokenizer.json``."""
        write_json_atomic(Path(directory) / SAVED_FILE, {
            "format": SAVED_FORMAT, "version": 1, "type": self.name, "vocab": list(self._ids),
            "special_tokens": self.special_tokens, "eos_token": self.eos_token,
            "bos_token": self.bos_token, "chat_template": self.chat_template,
        })

    @classmethod
    def load(cls, payload: dict, path: Path) -> ListVocabTokenizer:
        """The tokenizer of a parsed saved file, its contents checked."""
        vocab, specials = payload.get("vocab"), payload.get("special_tokens", {})
        if not isinstance(vocab, list) or not all(isinstance(t, str) for t in vocab):
            raise DataError(f"{path}: 'vocab' must be a list of strings",
                            "re-save the tokenizer with scratchlm")
        if not isinstance(specials, dict) or not all(
            isinstance(k, str) and type(v) is int and v >= 0 for k, v in specials.items()
        ):
            raise DataError(f"{path}: 'special_tokens' must map names to non-negative ids",
                            "re-save the tokenizer with scratchlm")
        ids = sorted(specials.values())
        if len(set(ids)) != len(ids) or (ids and ids[0] < len(vocab)):
            raise DataError(f"{path}: special-token ids must be distinct and follow the "
                            f"{len(vocab)} vocabulary entries",
                            "re-save the tokenizer with scratchlm")
        tok = cls(vocab, specials)
        tok.eos_token, tok.bos_token, tok.chat_template = (
            payload.get("eos_token"), payload.get("bos_token"), payload.get("chat_template"))
        return tok
