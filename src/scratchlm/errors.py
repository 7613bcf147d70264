"""User-facing errors.

A ``UserError`` is something the user can fix (a missing file, a bad option, a config that does
not fit).  The CLI prints it as one line, ``error: <what is wrong> — <how to fix>``, and exits 2,
without a traceback.  Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; ``str(err)`` is the whole one-line message."""

    def __init__(self, what: str, fix: str | None = None):
        self.what = what
        self.fix = fix
        super().__init__(f"{what} — {fix}" if fix else what)


class DataError(UserError):
    """Missing, empty, unreadable or malformed data (corpora, datasets, tokenizer files)."""


class ConfigError(UserError):
    """A configuration that is invalid or does not fit (preset, sizes, options)."""


class CheckpointError(UserError):
    """A checkpoint or weight file that is missing, corrupt, foreign or incompatible."""
