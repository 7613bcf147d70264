"""Text corpora, addressed by path or as ``builtin:NAME`` (public-domain texts shipped with the package)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from scratchlm.errors import DataError

BUILTIN_PREFIX = "builtin:"
BUILTIN_CORPORA = {
    "the-verdict": "the-verdict.txt",  # Edith Wharton, Raschka's pretraining example (20,479 chars)
    "tinyshakespeare": "tinyshakespeare.txt",  # char-rnn / nanoGPT corpus (1,115,394 chars)
}


def resolve_corpus(ref: str | Path) -> Path:
    """The file behind a path or ``builtin:NAME``; a clear error when it is missing."""
    ref = str(ref)
    if ref.startswith(BUILTIN_PREFIX):
        name = ref[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_CORPORA:
            raise DataError(
                f"unknown builtin corpus {name!r}",
                "choose one of " + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_CORPORA),
            )
        return Path(str(resources.files("scratchlm.data") / "corpora" / BUILTIN_CORPORA[name]))
    path = Path(ref).expanduser()
    if not path.exists():
        raise DataError(f"data file not found: {path}", "check the path, or use builtin:tinyshakespeare")
    if path.is_dir():
        raise DataError(f"{path} is a directory, not a text file", "pass a text file or builtin:NAME")
    return path


def read_corpus(ref: str | Path) -> str:
    """The whole text of a corpus (UTF-8); empty or undecodable files are user errors."""
    path = resolve_corpus(ref)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})",
                        "convert it to UTF-8") from None
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror}", "check the file's permissions") from None
    if not text:
        raise DataError(f"{path} is empty", "pass a file that contains text")
    return text
