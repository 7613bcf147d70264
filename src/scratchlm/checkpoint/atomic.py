"""Atomic writes: the one way scratchlm writes a file or a directory that someone will read back.

A file is written to a temporary name in the same directory, ``fsync``ed, then ``os.replace``d
over the old one, and the directory entry is ``fsync``ed too.  A crash or Ctrl-C mid-write leaves
the old file or the new one, never half of one, and once the call returns the new one survives a
power cut.  A directory (a tokenizer, a converted model) is built in a temporary directory beside
it and swapped in the same way.  The temporary names start with ``.tmp-`` and sit beside the
target, because a rename is atomic only within one file system.

No torch here: tokenizers and the n-gram counts write through this module without importing it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["TMP_PREFIX", "atomic_path", "atomic_dir", "write_json_atomic", "write_text_atomic"]

TMP_PREFIX = ".tmp-"


def _fsync(path: Path) -> None:
    """Flush a file's (or, for a directory, its entries') data to disk.  Some systems refuse
    to open or fsync a directory; a rename there is as durable as the OS makes it, so that is
    not an error."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success fsync it and rename it over ``path``.

    On an exception (KeyboardInterrupt included) the temporary file is removed and ``path`` is
    left as it was.  The parent directory is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)  # the file itself must reach the disk: not suppressed
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """``path.write_text(text)`` (UTF-8), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """``payload`` as indented UTF-8 JSON ending in a newline, atomically."""
    write_text_atomic(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path`` to fill; on success it replaces ``path``.

    A directory cannot be renamed over a non-empty one, so an existing ``path`` is first moved
    aside and deleted once the new one is in place (if the swap fails, it is moved back).  Readers
    may find ``path`` absent for the two renames between; they never find it half written.  On
    an exception while filling, the temporary directory is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    try:
        if path.exists():
            old = path.with_name(f"{TMP_PREFIX}{path.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not path.exists():
            os.replace(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_figure(fig: Any, path: str | Path) -> Path:
    """A matplotlib figure laid out, written as a PNG atomically, and closed (it holds memory until then)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
