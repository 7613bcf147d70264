"""Tokenizers: one interface (``Tokenizer``), three kinds, and ``load(ref)`` for files on disk.

- ``RegexWordTokenizer``: Raschka's chapter-2 word tokenizer (``word.py``).
- ``CharTokenizer``: one id per character, for character-level models (``char.py``).
- ``ByteLevelBPE``: GPT-2-style byte-level BPE, from GPT-2's files, a Hugging Face
  ``tokenizer.json`` or a GGUF vocabulary (``bpe.py``); trained by ``train_bpe.py``.

Importing this package is light (no torch, no transformers): the CLI's tokenizer commands use it.
"""

from __future__ import annotations

from pathlib import Path

from scratchlm.errors import DataError
from scratchlm.tokenizers.base import SAVED_FILE, SAVED_FORMAT, StreamDecoder, Tokenizer, read_json
from scratchlm.tokenizers.bpe import GPT2_PATTERN, GPT4_PATTERN, PATTERNS, ByteLevelBPE
from scratchlm.tokenizers.char import CharTokenizer
from scratchlm.tokenizers.word import RegexWordTokenizer

__all__ = [
    "Tokenizer", "StreamDecoder", "ByteLevelBPE", "CharTokenizer", "RegexWordTokenizer", "load",
    "GPT2_PATTERN", "GPT4_PATTERN", "PATTERNS",
]


def load(ref: str | Path) -> Tokenizer:
    """Open a tokenizer from disk.

    ``ref`` may be: a directory with GPT-2's ``encoder.json`` + ``vocab.bpe``; a ``tokenizer.json``
    or a directory holding one (``tokenizer_config.json`` beside it adds the chat template and
    eos/bos); a ``.gguf`` file; a directory (or file) written by a scratchlm tokenizer's ``save``;
    or a run directory whose ``tokenizer/`` folder holds one of these.
    """
    path = Path(ref).expanduser()
    if not path.exists():
        raise DataError(f"tokenizer not found: {path}",
                        "pass a directory with tokenizer.json, encoder.json + vocab.bpe or "
                        f"{SAVED_FILE}, a tokenizer.json file, or a .gguf file")
    if path.is_dir():
        for name in (SAVED_FILE, "tokenizer.json"):
            if (path / name).is_file():
                return load(path / name)
        if (path / "encoder.json").is_file() or (path / "vocab.bpe").is_file():
            return ByteLevelBPE.from_gpt2_files(path / "encoder.json", path / "vocab.bpe")
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():  # the same files, HF names
            return ByteLevelBPE.from_gpt2_files(path / "vocab.json", path / "merges.txt")
        if (path / "tokenizer").is_dir():  # a run directory keeps its tokenizer in tokenizer/
            return load(path / "tokenizer")
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ByteLevelBPE.from_gguf(ggufs[0])
        raise DataError(f"{path} holds no tokenizer", "expected tokenizer.json, encoder.json + vocab.bpe, "
                        f"{SAVED_FILE}, a tokenizer/ folder or one .gguf file in it")
    if path.suffix == ".gguf":
        return ByteLevelBPE.from_gguf(path)
    if path.name == "encoder.json":
        return ByteLevelBPE.from_gpt2_files(path, path.with_name("vocab.bpe"))
    if path.suffix == ".json":
        if path.name == SAVED_FILE:
            return _load_saved(path)
        return ByteLevelBPE.from_tokenizer_json(path)
    raise DataError(f"{path} is not a tokenizer file I know",
                    "pass a tokenizer.json, a .gguf file, or a directory holding a tokenizer")


def _load_saved(path: Path) -> Tokenizer:
    payload = read_json(path, "a saved scratchlm tokenizer")
    if not isinstance(payload, dict) or payload.get("format") != SAVED_FORMAT:
        raise DataError(f"{path} is not a scratchlm tokenizer file (no \"format\": \"{SAVED_FORMAT}\")",
                        "re-save the tokenizer with scratchlm")
    kinds = {"word": RegexWordTokenizer, "char": CharTokenizer}
    kind = payload.get("type")
    if kind not in kinds:
        raise DataError(f"{path}: unknown tokenizer type {kind!r}", f"expected one of {', '.join(kinds)}")
    return kinds[kind].load(payload, path)
