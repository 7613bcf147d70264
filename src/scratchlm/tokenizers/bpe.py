"""Byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM2): encode, decode, and the files it comes in.

How text becomes ids:
1. cut out special tokens (base class), and apply the vocabulary's normalizer, if any;
2. split the text into pieces with the vocabulary's regex (``GPT2_PATTERN`` ...), so merges never
   cross a word boundary;
3. each piece's UTF-8 bytes start as single-byte tokens and the adjacent pair with the lowest merge
   rank (its index in ``merges``, Hugging Face's rule) is merged until no listed pair remains.

Natural text repeats its pieces (tinyshakespeare: 300k pieces, 15k distinct), so step 3 is
memoised in a dict from piece to ids; the encode loop is one ``extend(cache[piece])`` per piece,
and the merge loop runs only on a miss.  The split regex is then most of the time.

Vocabularies are held as ``bytes -> id``.  On disk (``encoder.json``, ``tokenizer.json``, GGUF)
GPT-2's byte-to-unicode table spells each byte as a printable character; see ``BYTE_TO_CHAR``.
"""

from __future__ import annotations

import codecs
import heapq
import itertools
import unicodedata
from collections.abc import Iterable
from pathlib import Path

import regex

from scratchlm.checkpoint.atomic import write_json_atomic
from scratchlm.errors import ConfigError, DataError, UserError
from scratchlm.tokenizers.base import Tokenizer, read_json

# ----- split patterns: one place for every family's regex ---------------------------------------

#: GPT-2 (and Hugging Face's ``ByteLevel(use_regex=True)``): contractions, words, numbers,
#: punctuation runs, each with at most one leading space; whitespace before a word stays apart.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

#: GPT-4's cl100k_base, written so that Python's ``regex``, Oniguruma (Hugging Face) and tiktoken
#: all read it alike: tiktoken's string uses possessive quantifiers, and Oniguruma reads ``{1,3}+``
#: as "repeat {1,3} once or more"; ``\s++$`` becomes ``\s+(?![\s\S])`` because ``$`` means end of
#: *line* in Oniguruma.  Same splits as tiktoken's cl100k (tested against it).
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s+(?![\s\S])|\s*[\r\n]|\s+(?!\S)|\s"""
)

#: Llama 3 (cl100k as Llama 3's tokenizer.json writes it: no rule for whitespace at the end of text).
LLAMA3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

#: Qwen2 / Qwen2.5 / Qwen3: Llama 3's pattern with every digit on its own.
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

#: GPT-4o / o200k_base: splits camelCase words, keeps contractions on their word.
GPT4O_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""", r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""", r"""\s*[\r\n]+""", r"""\s+(?!\S)""", r"""\s+""",
])

#: SmolLM2 / StarCoder: Hugging Face's ``Sequence[Digits(individual_digits), ByteLevel]``, i.e. each
#: digit alone, then GPT-2's regex on the text between digits.  Folded into one regex: digits
#: never join a piece, and a digit ends a whitespace run as the end of the text would.
SMOLLM2_PATTERN = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""

PATTERNS = {
    "gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN, "gpt4o": GPT4O_PATTERN,
    "llama3": LLAMA3_PATTERN, "qwen2": QWEN2_PATTERN, "smollm2": SMOLLM2_PATTERN,
}

# The same splits, alternatives reordered for speed (docs/benchmarks.md, "Encode throughput"):
# letters first, as most positions start a word, so findall tries fewer alternatives.  Safe
# because at any position at most one of the reordered alternatives can match (a contraction
# needs "'", a word a letter or a space then a letter); tested equal.
_FAST_FORMS = {
    GPT2_PATTERN: r""" ?\p{L}+| ?\p{N}+|'s|'t|'re|'ve|'m|'ll|'d| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    SMOLLM2_PATTERN: r""" ?\p{L}+|\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+""",
}

#: llama.cpp's ``tokenizer.ggml.pre`` names -> the pattern the vocabulary was trained with.  The
#: first name of each pattern is the one our GGUF export writes: llama.cpp knows all of them but
#: "gpt2" (GPT-2's is "gpt-2"; "gpt2" is read for files that use it anyway).
GGUF_PRE_PATTERNS = {
    "gpt-2": GPT2_PATTERN, "gpt2": GPT2_PATTERN,
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "dbrx"], LLAMA3_PATTERN),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "megrez"], QWEN2_PATTERN),
    **dict.fromkeys(["gpt-4o", "llama4"], GPT4O_PATTERN),
    **dict.fromkeys(["smollm", "starcoder", "refact", "codeshell"], SMOLLM2_PATTERN),
}

#: Patterns llama.cpp has no ``pre`` name for -> the name of the nearest one, which our GGUF export
#: writes so that llama.cpp and transformers read the file.  cl100k (GPT4_PATTERN, ``train_bpe``'s
#: default) and llama-bpe (LLAMA3_PATTERN) split every text alike except a run of whitespace that
#: ends the text and holds a "\n" or "\r": cl100k keeps it whole ("\n  "), llama-bpe cuts it after
#: the line break ("\n", "  ").
GGUF_NEAREST_PRE = {GPT4_PATTERN: "llama-bpe"}
#: The exact split regex, written beside a nearest ``pre`` name; ``from_gguf`` prefers it.
GGUF_PATTERN_KEY = "scratchlm.tokenizer.pattern"


def resolve_pattern(pattern: str, *, strict: bool) -> str:
    """The split regex for a name (``gpt2``, ``gpt4``, any key of ``PATTERNS``) or a regex.

    ``strict=True`` is for a pattern a person typed (``train_bpe``, the CLI): names in any case, a
    regex that must compile, and a bare word that is no known name refused (``"gpt3"`` is a typo,
    not a wish to split on the literal text ``gpt3``); errors are ``ConfigError``.
    ``strict=False`` is for a pattern read from a tokenizer file: a known name (exactly) is
    resolved, anything else is the file's regex as is, even a bare word (a ``String`` split
    escapes to one); the constructor reports a regex that does not compile.
    """
    if not strict:
        return PATTERNS.get(pattern, pattern)
    key = pattern.strip().lower()
    if key in PATTERNS:
        return PATTERNS[key]
    if regex.fullmatch(r"[A-Za-z0-9_.-]+", pattern):
        raise ConfigError(f"unknown split pattern {pattern!r}",
                          "use one of " + ", ".join(PATTERNS) + ", or pass a regular expression")
    try:
        regex.compile(pattern)
    except regex.error as err:
        raise ConfigError(f"invalid split pattern regex: {err}", "fix the regular expression") from None
    return pattern


# ----- GPT-2's byte <-> printable-character table ------------------------------------------------

def _byte_alphabet() -> list[str]:
    """Bytes that are printable Latin-1 stand for themselves; the other 68 take the characters
    from U+0100 up, in byte order.  That is why a leading space shows as 'Ġ' (U+0120) in vocabularies."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    others = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(others)) for b in range(256)]


BYTE_TO_CHAR: list[str] = _byte_alphabet()
CHAR_TO_BYTE: dict[str, int] = {c: b for b, c in enumerate(BYTE_TO_CHAR)}
_SINGLE_BYTES = [bytes([b]) for b in range(256)]


# The table as a charmap codec (C speed: vocabularies have 50k-150k tokens to convert).
_ALPHABET = "".join(BYTE_TO_CHAR)
_ENCODING_MAP = codecs.charmap_build(_ALPHABET)


def bytes_to_token(data: bytes) -> str:
    """``b' the'`` -> ``'Ġthe'`` (the spelling used in vocabulary files)."""
    return codecs.charmap_decode(data, "strict", _ALPHABET)[0]


def token_to_bytes(token: str) -> bytes | None:
    """``'Ġthe'`` -> ``b' the'``, or None when ``token`` uses characters outside the byte alphabet."""
    try:
        return codecs.charmap_encode(token, "strict", _ENCODING_MAP)[0]
    except UnicodeEncodeError:
        return None


# ----- the tokenizer ----------------------------------------------------------------------------

_WHITESPACE = r"[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*"
_LONG_PIECE = 128  # pieces with more bytes than this use the heap merge (O(n log n) instead of O(n^2))
_CACHE_LIMIT = 1 << 18  # pieces remembered before the cache starts over (bounds memory on odd text)
_NORMALIZERS = ("NFC", "NFD", "NFKC", "NFKD")


class ByteLevelBPE(Tokenizer):
    """Byte-level BPE over ``encoder`` (token bytes -> id) and ranked ``merges``.

    ``special_tokens`` are subject to ``allowed_special``; ``added_tokens`` (Hugging Face added
    tokens that are not special, GGUF user-defined tokens) are always matched whole.
    ``ignore_merges``: a piece that is itself a token is emitted whole (Llama 3's tokenizer.json).
    ``normalizer``: None or a Unicode form (``"NFC"``; Qwen2 uses it) applied to ordinary text.
    ``strip``: special/added token -> (lstrip, rstrip), Hugging Face's flags to absorb whitespace.
    ``unk_id``: what a byte missing from the vocabulary becomes (None: it is dropped before merging,
    as Hugging Face drops it).
    """

    def __init__(
        self,
        encoder: dict[bytes, int],
        merges: list[tuple[bytes, bytes]],
        special_tokens: dict[str, int],
        pattern: str,
        name: str = "bpe",
        *,
        added_tokens: dict[str, int] | None = None,
        ignore_merges: bool = False,
        normalizer: str | None = None,
        strip: dict[str, tuple[bool, bool]] | None = None,
        unk_id: int | None = None,
        eos_token: str | None = None,
        bos_token: str | None = None,
        chat_template: str | None = None,
    ):
        if eos_token is None:  # no config to say: the conventional names
            eos_token = next((t for t in ("<|endoftext|>", "<|end_of_text|>") if t in special_tokens), None)
        super().__init__(special_tokens, eos_token=eos_token, bos_token=bos_token,
                         chat_template=chat_template)
        self.name = name
        self.encoder = dict(encoder)
        self.merges = [(bytes(a), bytes(b)) for a, b in merges]
        self.added_tokens = dict(added_tokens or {})
        self.pattern = resolve_pattern(pattern, strict=False)
        self.ignore_merges = ignore_merges
        if normalizer not in (None, *_NORMALIZERS):
            raise UserError(f"unknown normalizer {normalizer!r}",
                            f"use one of {', '.join(_NORMALIZERS)} or None")
        self.normalizer = normalizer
        self.strip = {k: v for k, v in (strip or {}).items() if any(v)}
        # Some vocabularies (SmolLM2) lack a few control bytes; like Hugging Face, such a byte
        # becomes ``unk_id`` or, without one, is dropped.
        self.unk_id = unk_id
        self._all_bytes = all(b in self.encoder for b in _SINGLE_BYTES)
        known = self.encoder
        for rank, (a, b) in enumerate(self.merges):
            if a + b not in known or a not in known or b not in known:
                raise DataError(f"merge {rank + 1} of the {name} vocabulary "
                                f"({bytes_to_token(a)} {bytes_to_token(b)}) uses a token that is not in "
                                "the vocabulary",
                                "the merges and the vocabulary come from different tokenizers")
        # A pair listed twice keeps its last rank, as Hugging Face's merge map does.
        self._ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        try:
            self._regex = regex.compile(_FAST_FORMS.get(self.pattern, self.pattern))
        except regex.error as err:
            raise DataError(f"the split pattern of the {name} tokenizer does not compile: {err}",
                            "fix the regex in the tokenizer file") from None
        self._findall = self._regex.findall
        # Our named patterns match every character; a custom one may skip some (see _split_with_gaps).
        self._covers_all = self.pattern in PATTERNS.values()
        self._cache: dict[str, list[int]] = {}
        ids = itertools.chain(self.encoder.values(), self.special_tokens.values(), self.added_tokens.values())
        table: list[bytes | None] = [None] * (max(ids) + 1)
        for token, i in self.encoder.items():
            table[i] = token
        for text, i in itertools.chain(self.added_tokens.items(), self.special_tokens.items()):
            table[i] = text.encode("utf-8")
        self._decode_table = table
        self._vocab_size = len(table)

    # ----- encoding ---------------------------------------------------------------------------

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of ``text`` with no special-token handling (tiktoken's ``encode_ordinary``)."""
        if self.normalizer:
            text = unicodedata.normalize(self.normalizer, text)
        pieces = self._findall(text)
        if not self._covers_all and sum(map(len, pieces)) != len(text):
            pieces = self._split_with_gaps(text)
        # The hot loop: one dict lookup and one extend per piece, nothing else.  A miss aborts it
        # and the slower loop below, which runs BPE on new pieces, starts over.
        cache = self._cache
        ids: list[int] = []
        extend = ids.extend
        try:
            for piece in pieces:
                extend(cache[piece])
            return ids
        except KeyError:
            pass
        ids = []
        for piece in pieces:
            found = cache.get(piece)
            if found is None:
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                found = cache[piece] = self.encode_piece(piece.encode("utf-8"))
            ids.extend(found)
        return ids

    def _split_with_gaps(self, text: str) -> list[str]:
        """Hugging Face's ``Split(behavior="Isolated")``: text the regex skips is a piece too.
        (The standard patterns cover every character, so this only runs for custom ones.)"""
        pieces, start = [], 0
        for match in self._regex.finditer(text):
            if match.start() > start:
                pieces.append(text[start:match.start()])
            if match.end() > match.start():
                pieces.append(match.group())
            start = match.end()
        if start < len(text):
            pieces.append(text[start:])
        return pieces

    def encode_piece(self, data: bytes) -> list[int]:
        """BPE on one pre-tokenized piece: its bytes, merged by rank, as ids."""
        encoder = self.encoder
        if self.ignore_merges or len(data) == 1:
            whole = encoder.get(data)
            if whole is not None:
                return [whole]
        symbols = list(map(_SINGLE_BYTES.__getitem__, data))
        if not self._all_bytes and self.unk_id is None:
            # Hugging Face's BPE leaves a byte the vocabulary lacks out of the word before merging,
            # so its neighbours may merge across it ('"', 0x06, ':' is one token '":' in SmolLM2).
            symbols = [s for s in symbols if s in encoder]
            if not symbols:
                return []
        merge = _merge_long if len(symbols) > _LONG_PIECE else _merge_short
        merged = merge(symbols, self._ranks)
        if self._all_bytes:
            return [encoder[s] for s in merged]
        ids = [encoder.get(s, self.unk_id) for s in merged]
        return [i for i in ids if i is not None]

    # ----- decoding and lookups ---------------------------------------------------------------

    def token_bytes(self, token_id: int) -> bytes:
        if token_id < 0:
            raise IndexError(token_id)
        data = self._decode_table[token_id]
        if data is None:
            raise KeyError(token_id)
        return data

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of ``ids`` (may end inside a UTF-8 character)."""
        if not isinstance(ids, list):
            ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # tensors and arrays too
        try:
            if ids and min(ids) < 0:
                raise IndexError(min(ids))
            return b"".join(map(self._decode_table.__getitem__, ids))
        except (IndexError, TypeError) as err:
            raise self._bad_id_error(ids) from err

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def _lookup(self, token: str) -> int | None:
        if token in self.added_tokens:
            return self.added_tokens[token]
        return self.encoder.get(token.encode("utf-8"))

    def _always_split(self) -> frozenset[str]:
        return frozenset(self.added_tokens)

    def _special_alternative(self, name: str) -> str:
        lstrip, rstrip = self.strip.get(name, (False, False))
        return (_WHITESPACE if lstrip else "") + regex.escape(name) + (_WHITESPACE if rstrip else "")

    def _special_id(self, matched: str) -> int:
        for text in (matched, matched.lstrip(), matched.rstrip(), matched.strip()):
            if text in self.special_tokens:
                return self.special_tokens[text]
            if text in self.added_tokens:
                return self.added_tokens[text]
        raise KeyError(matched)

    # ----- saving: Hugging Face tokenizer.json ------------------------------------------------

    def to_hf_json(self) -> dict:
        """This tokenizer as a Hugging Face ``tokenizer.json`` document."""
        vocab = {bytes_to_token(token): i for token, i in sorted(self.encoder.items(), key=lambda kv: kv[1])}
        added = []
        for text, i in sorted({**self.added_tokens, **self.special_tokens}.items(), key=lambda kv: kv[1]):
            lstrip, rstrip = self.strip.get(text, (False, False))
            added.append({"id": i, "content": text, "single_word": False, "lstrip": lstrip, "rstrip": rstrip,
                          "normalized": False, "special": text in self.special_tokens})
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                      "use_regex": False}
        split = {"type": "Split", "pattern": {"Regex": self.pattern}, "behavior": "Isolated", "invert": False}
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": {"type": self.normalizer} if self.normalizer else None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, byte_level]},
            "post_processor": {**byte_level, "trim_offsets": False},
            "decoder": byte_level,
            "model": {
                "type": "BPE", "dropout": None, "unk_token": self._unk_token(),
                "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": False,
                "byte_fallback": False, "ignore_merges": self.ignore_merges, "vocab": vocab,
                "merges": [f"{bytes_to_token(a)} {bytes_to_token(b)}" for a, b in self.merges],
            },
        }

    def _unk_token(self) -> str | None:
        if self.unk_id is None:
            return None
        for text, i in itertools.chain(self.special_tokens.items(), self.added_tokens.items()):
            if i == self.unk_id:
                return text
        return bytes_to_token(self._decode_table[self.unk_id])

    def save(self, directory: str | Path) -> None:
        """Write ``tokenizer.json`` (and ``tokenizer_config.json`` for eos/bos/chat template)."""
        directory = Path(directory)
        write_json_atomic(directory / "tokenizer.json", self.to_hf_json())
        if self.chat_template or self.eos_token or self.bos_token:
            config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.eos_token,
                      "bos_token": self.bos_token, "chat_template": self.chat_template}
            config = {k: v for k, v in config.items() if v is not None}
            write_json_atomic(directory / "tokenizer_config.json", config)

    # ----- loading ------------------------------------------------------------------------------

    @classmethod
    def from_gpt2_files(cls, encoder_json: str | Path, vocab_bpe: str | Path) -> ByteLevelBPE:
        """OpenAI's GPT-2 release: ``encoder.json`` (token -> id) and ``vocab.bpe`` (merges)."""
        encoder_json, vocab_bpe = Path(encoder_json), Path(vocab_bpe)
        vocab = read_json(encoder_json, "GPT-2's encoder.json")
        encoder = _parse_vocab(vocab, encoder_json, "the file")
        merges = _parse_merges(_read_merge_lines(vocab_bpe), vocab_bpe)
        specials = {"<|endoftext|>": vocab["<|endoftext|>"]} if "<|endoftext|>" in vocab else {}
        return _build(cls, encoder, merges, specials, GPT2_PATTERN, "gpt2", encoder_json)

    @classmethod
    def from_tokenizer_json(cls, path: str | Path, config: str | Path | None = None) -> ByteLevelBPE:
        """A Hugging Face ``tokenizer.json`` holding a byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM2).

        ``config`` (default: ``tokenizer_config.json`` beside it, when present) supplies the chat
        template and the eos/bos names.
        """
        path = Path(path)
        doc = read_json(path, "a Hugging Face tokenizer.json")
        if not isinstance(doc, dict) or not isinstance(doc.get("model"), dict):
            raise DataError(f"{path} has no 'model' section", "this is not a Hugging Face tokenizer.json")
        model = doc["model"]
        _check_bpe_model(model, path)
        pattern = _pattern_from_pre_tokenizer(doc.get("pre_tokenizer"), path)
        normalizer = _normalizer_form(doc.get("normalizer"), path)
        encoder = _parse_vocab(model.get("vocab"), path, "model.vocab")
        merges = _parse_merges(model.get("merges"), path)
        specials: dict[str, int] = {}
        added: dict[str, int] = {}
        strip: dict[str, tuple[bool, bool]] = {}
        for entry in doc.get("added_tokens") or []:
            try:
                content, token_id = entry["content"], int(entry["id"])
            except (KeyError, TypeError, ValueError):
                raise DataError(f"{path}: malformed added_tokens entry {entry!r}",
                                "each needs 'id' and 'content'") from None
            if entry.get("single_word"):
                raise UserError(f"{path}: added token {content!r} has single_word=true, which scratchlm "
                                "does not support", "set single_word to false in tokenizer.json")
            (specials if entry.get("special") else added)[content] = token_id
            strip[content] = (bool(entry.get("lstrip")), bool(entry.get("rstrip")))
        config_path = Path(config) if config else path.with_name("tokenizer_config.json")
        eos, bos, template = (None, None, None)
        if config_path.exists():
            eos, bos, template = _read_tokenizer_config(config_path)
        name = path.parent.name or "tokenizer.json"
        unk = model.get("unk_token")
        unk_id = None
        if unk:
            unk_id = {**{bytes_to_token(t): i for t, i in encoder.items()}, **specials, **added}.get(unk)
        tok = _build(cls, encoder, merges, specials, pattern, name, path, added_tokens=added, unk_id=unk_id,
                     ignore_merges=bool(model.get("ignore_merges")), normalizer=normalizer, strip=strip)
        tok.chat_template = template
        for attr, token in (("eos_token", eos), ("bos_token", bos)):
            if token is not None:
                found = tok._lookup(token)
                if token not in tok.special_tokens and found is not None:
                    tok.special_tokens[token] = found  # eos/bos are special, whatever added_tokens says
                setattr(tok, attr, token if token in tok.special_tokens else None)
        return tok

    @classmethod
    def from_gguf(cls, path: str | Path) -> ByteLevelBPE:
        """The vocabulary inside a llama.cpp ``.gguf`` file (``tokenizer.ggml.*`` keys).

        The split pattern is the one ``tokenizer.ggml.pre`` names, unless the file holds the exact
        regex under ``GGUF_PATTERN_KEY`` (our export writes it where the name is only the nearest
        one, see ``GGUF_NEAREST_PRE``): that one is used, whatever the name.
        """
        from gguf import TokenType

        from scratchlm.checkpoint.gguf_file import read_gguf

        path = Path(path)
        meta = read_gguf(path).metadata
        model = meta.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise DataError(
                f"{path}: its vocabulary is tokenizer.ggml.model={model!r}, not byte-level BPE",
                "scratchlm reads only byte-level BPE GGUF vocabularies (model 'gpt2': GPT-2, Llama 3, Qwen2, "
                "SmolLM2); use the model's tokenizer.json instead")
        pre = meta.get("tokenizer.ggml.pre", "gpt2")
        pattern = meta.get(GGUF_PATTERN_KEY)
        if pattern is not None and not isinstance(pattern, str):
            raise DataError(f"{path}: {GGUF_PATTERN_KEY} is not a string",
                            "the file is damaged; re-export it or use the tokenizer.json")
        if pattern is None and pre not in GGUF_PRE_PATTERNS:
            raise DataError(f"{path}: unknown pre-tokenizer tokenizer.ggml.pre={pre!r}",
                            f"supported: {', '.join(sorted(GGUF_PRE_PATTERNS))}; or use the tokenizer.json")
        tokens = meta.get("tokenizer.ggml.tokens")
        merge_lines = meta.get("tokenizer.ggml.merges")
        if not isinstance(tokens, list) or not isinstance(merge_lines, list):
            raise DataError(f"{path} lacks tokenizer.ggml.tokens or tokenizer.ggml.merges",
                            "the file has no usable vocabulary; use the model's tokenizer.json")
        types = meta.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)
        if len(types) != len(tokens):
            raise DataError(f"{path} has {len(tokens)} tokens but {len(types)} token types",
                            "the file is damaged; re-convert it or use the model's tokenizer.json")
        encoder: dict[bytes, int] = {}
        specials: dict[str, int] = {}
        added: dict[str, int] = {}
        for i, (token, kind) in enumerate(zip(tokens, types, strict=True)):
            data = token_to_bytes(token)
            if kind == TokenType.CONTROL and data is not None:
                specials[token] = i
            elif kind == TokenType.USER_DEFINED:
                added[token] = i
            encoder.setdefault(data if data is not None else token.encode("utf-8"), i)
        merges = _parse_merges(merge_lines, path)

        names = {}
        for role in ("eos", "bos"):
            i = meta.get(f"tokenizer.ggml.{role}_token_id")
            if isinstance(i, int) and 0 <= i < len(tokens):
                names[role] = tokens[i]
                specials.setdefault(tokens[i], i)
        eos, bos = names.get("eos"), names.get("bos")
        return _build(cls, encoder, merges, specials, pattern or GGUF_PRE_PATTERNS[pre], path.stem, path,
                      added_tokens=added, eos_token=eos, bos_token=bos,
                      chat_template=meta.get("tokenizer.chat_template"))


# ----- the merge loops --------------------------------------------------------------------------

_NO_MERGE = 1 << 62  # rank of a pair that is not a merge: ints keep min() in C


def _merge_short(symbols: list[bytes], ranks: dict[tuple[bytes, bytes], int]) -> list[bytes]:
    """Repeatedly merge the leftmost pair of lowest rank: O(n^2) worst case, fastest for short pieces.

    ``pair_ranks[i]`` is the rank of ``(symbols[i], symbols[i + 1])``; a merge changes only the
    two entries beside it, so each step is a C-level ``min`` and ``index`` plus two lookups.
    """
    get = ranks.get
    pair_ranks = list(map(get, zip(symbols, symbols[1:], strict=False), itertools.repeat(_NO_MERGE)))
    while pair_ranks:
        best = min(pair_ranks)
        if best == _NO_MERGE:
            break
        i = pair_ranks.index(best)
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        del pair_ranks[i]
        if i < len(pair_ranks):
            pair_ranks[i] = get((symbols[i], symbols[i + 1]), _NO_MERGE)
        if i > 0:
            pair_ranks[i - 1] = get((symbols[i - 1], symbols[i]), _NO_MERGE)
    return symbols


def _merge_long(symbols: list[bytes], ranks: dict[tuple[bytes, bytes], int]) -> list[bytes]:
    """The same merges via a heap of (rank, position) over a linked list: O(n log n) for long pieces.

    A heap entry remembers the two symbols it saw; if either changed since, the entry is stale
    and skipped.  Positions only ever keep their left index, so (rank, position) order is exactly
    'lowest rank, then leftmost', as in ``_merge_short``.
    """
    n = len(symbols)
    after = list(range(1, n + 1))  # index of the next live symbol (n: none)
    before = list(range(-1, n - 1))
    heap = [(r, i, symbols[i], symbols[i + 1]) for i in range(n - 1)
            if (r := ranks.get((symbols[i], symbols[i + 1]))) is not None]
    heapq.heapify(heap)
    while heap:
        _, i, left, right = heapq.heappop(heap)
        j = after[i]
        if j >= n or symbols[i] is not left or symbols[j] is not right:
            continue
        symbols[i] = left + right
        symbols[j] = None
        after[i] = after[j]
        if after[j] < n:
            before[after[j]] = i
        for a, b in ((before[i], i), (i, after[i])):
            if a >= 0 and b < n:
                rank = ranks.get((symbols[a], symbols[b]))
                if rank is not None:
                    heapq.heappush(heap, (rank, a, symbols[a], symbols[b]))
    return [s for s in symbols if s is not None]


# ----- file parsing helpers ---------------------------------------------------------------------

def _build(cls, encoder, merges, specials, pattern, name, path, **kwargs) -> ByteLevelBPE:
    """Construct, turning a vocabulary inconsistency into an error that names the file."""
    try:
        return cls(encoder, merges, specials, pattern, name, **kwargs)
    except DataError as err:
        raise DataError(f"{path}: {err.what}", err.fix) from None


def _parse_vocab(vocab: object, path: Path, where: str) -> dict[bytes, int]:
    if not isinstance(vocab, dict) or not vocab:
        raise DataError(f"{path}: {where} must be a non-empty JSON object of token -> id",
                        "the file is not a byte-level BPE vocabulary")
    encoder: dict[bytes, int] = {}
    for token, i in vocab.items():
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise DataError(f"{path}: token {token!r} has id {i!r}, not a non-negative integer",
                            "the vocabulary file is damaged")
        data = token_to_bytes(token)
        encoder[data if data is not None else token.encode("utf-8")] = i
    return encoder


def _read_merge_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path} not found",
                        "GPT-2's vocab.bpe (the merges) must sit beside encoder.json") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {path}: {err}",
                        "vocab.bpe must be a readable UTF-8 text file") from None
    lines = text.split("\n")
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    return [line for line in lines if line]


def _parse_merges(merges: object, path: Path) -> list[tuple[bytes, bytes]]:
    """Merges as ``"a b"`` strings (vocab.bpe, older tokenizer.json, GGUF) or ``[a, b]`` pairs."""
    if not isinstance(merges, list):
        raise DataError(f"{path}: the merges must be a list", "the file is not a byte-level BPE vocabulary")
    parsed = []
    spelled: dict[str, bytes | None] = {}  # each token appears in many merges; convert it once
    for k, merge in enumerate(merges):
        try:
            left, right = merge.split(" ") if isinstance(merge, str) else merge
            pair = (spelled[left] if left in spelled else spelled.setdefault(left, token_to_bytes(left)),
                    spelled[right] if right in spelled else spelled.setdefault(right, token_to_bytes(right)))
        except (TypeError, ValueError, AttributeError):
            pair = (None, None)
        if not pair[0] or not pair[1]:
            raise DataError(f"{path}: merge {k + 1} ({merge!r}) is not two byte-level tokens",
                            "each merge must be 'left right' in GPT-2's byte alphabet")
        parsed.append(pair)
    return parsed


_BYTE_LEVEL_ONLY = "scratchlm reads byte-level BPE tokenizer.json files (GPT-2, Llama 3, Qwen2, SmolLM2)"


def _check_bpe_model(model: dict, path: Path) -> None:
    kind = model.get("type", "BPE" if "merges" in model else None)
    if kind != "BPE":
        raise UserError(f"{path} holds a {kind} model, not byte-level BPE",
                        _BYTE_LEVEL_ONLY)
    if model.get("byte_fallback"):
        raise UserError(f"{path} is a SentencePiece-style BPE (byte_fallback), not byte-level BPE",
                        _BYTE_LEVEL_ONLY)
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise UserError(f"{path}: BPE with {key}={model[key]!r} is not byte-level BPE",
                            _BYTE_LEVEL_ONLY)
    if model.get("dropout"):
        raise UserError(f"{path}: BPE dropout={model['dropout']} makes encoding random",
                        "set dropout to null in tokenizer.json")


def _pattern_from_pre_tokenizer(spec: object, path: Path) -> str:
    """The one regex equivalent to the pre-tokenizer shapes real byte-level files use."""
    steps = spec.get("pretokenizers") if isinstance(spec, dict) and spec.get("type") == "Sequence" else [spec]
    kinds = [s.get("type") if isinstance(s, dict) else None for s in steps or [None]]
    byte_level = steps[-1] if kinds[-1] == "ByteLevel" else None
    if byte_level is not None and byte_level.get("add_prefix_space"):
        raise UserError(f"{path}: ByteLevel add_prefix_space=true is not supported",
                        "set add_prefix_space to false in tokenizer.json (and prepend the space yourself)")
    use_regex = byte_level is not None and byte_level.get("use_regex", True)
    if kinds == ["ByteLevel"] and use_regex:
        return GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"] and use_regex and steps[0].get("individual_digits"):
        return SMOLLM2_PATTERN
    if kinds == ["Split", "ByteLevel"] and not use_regex:
        split = steps[0]
        pattern = split.get("pattern") or {}
        if split.get("behavior", "Isolated") == "Isolated" and not split.get("invert"):
            if isinstance(pattern.get("Regex"), str):
                return pattern["Regex"]
            if isinstance(pattern.get("String"), str):
                return regex.escape(pattern["String"])
    raise UserError(f"{path}: unsupported pre_tokenizer {' + '.join(map(str, kinds))}",
                    "scratchlm reads ByteLevel, Split(Isolated) + ByteLevel, and Digits + ByteLevel "
                    "(the shapes of GPT-2, Llama 3, Qwen2 and SmolLM2)")


def _normalizer_form(spec: object, path: Path) -> str | None:
    if spec is None:
        return None
    steps = spec.get("normalizers") if isinstance(spec, dict) and spec.get("type") == "Sequence" else [spec]
    kinds = [s.get("type") if isinstance(s, dict) else None for s in steps]
    if not kinds:
        return None
    if len(kinds) == 1 and kinds[0] in _NORMALIZERS:
        return kinds[0]
    raise UserError(f"{path}: unsupported normalizer {' + '.join(map(str, kinds))}",
                    "scratchlm supports no normalizer or one Unicode form (NFC, NFD, NFKC, NFKD)")


def _read_tokenizer_config(path: Path) -> tuple[str | None, str | None, str | None]:
    """``(eos_token, bos_token, chat_template)`` from ``tokenizer_config.json``."""
    config = read_json(path, "tokenizer_config.json")
    if not isinstance(config, dict):
        raise DataError(f"{path} is not a JSON object", "tokenizer_config.json looks damaged")

    def token_name(value: object) -> str | None:
        if isinstance(value, dict):
            value = value.get("content")
        return value if isinstance(value, str) else None

    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return token_name(config.get("eos_token")), token_name(config.get("bos_token")), (
        template if isinstance(template, str) else None)

