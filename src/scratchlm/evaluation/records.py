"""JSONL in and out for the evaluators: one JSON object per line, read with line numbers in errors,
written atomically (a whole file) or appended and flushed one record at a time (results that
arrive one by one, so an interrupted run keeps what it has).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from scratchlm.errors import DataError


def read_jsonl(path: str | Path, what: str = "file") -> list[dict[str, Any]]:
    """The objects of a JSONL file (blank lines skipped); a bad line is a ``DataError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist", "check the path")
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number} is not JSON ({e.msg})",
                                "write one JSON object per line (JSONL)") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number} is a JSON {type(record).__name__}, not an object",
                                "write one JSON object per line (JSONL)")
            records.append(record)
    return records


def is_jsonl(path: str | Path) -> bool:
    """True when the first non-blank line of ``path`` is a JSON object (else: plain text lines)."""
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    return isinstance(json.loads(line), dict)
                except json.JSONDecodeError:
                    return False
    return False


def read_lines(path: str | Path, what: str = "file") -> list[str]:
    """The lines of a text file, without their line ends (a final newline adds no empty line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist", "check the path")
    return path.read_text(encoding="utf-8").splitlines()


def pick_field(record: Mapping[str, Any], names: Sequence[str], where: str) -> Any:
    """The first of ``names`` that ``record`` has; a ``DataError`` listing them when none is there."""
    for name in names:
        if name in record:
            return record[name]
    raise DataError(f"{where} has none of the fields {', '.join(map(repr, names))} "
                    f"(it has {', '.join(map(repr, record)) or 'no fields'})",
                    "name the field as listed, or map it with the command's field options")


def write_jsonl(path: str | Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Write ``records`` as JSONL, atomically (a reader never sees half a file)."""
    from scratchlm.checkpoint.atomic import atomic_path

    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


class JsonlAppender:
    """Append records to a JSONL file one at a time, each flushed and fsynced as it is written.

    What was written survives an interrupt; a torn last line (the process killed mid-write) is
    dropped by ``read_existing`` on the next run, which then asks for that record again.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_existing(path: str | Path) -> list[dict[str, Any]]:
    """The complete records of an append-only JSONL file (none if it does not exist).

    A last line without its newline is a record cut off by an interrupt: it is truncated away
    so that appending continues on a clean line.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    if cut < len(data):
        with path.open("r+b") as f:
            f.truncate(cut)
    records = []
    for number, line in enumerate(data[:cut].decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(f"{path}:{number} is not JSON", "move the file away to start over") from None
    return records


RESPONSE_FIELDS = ("response", "model_response", "prediction")  # finetuning's test_responses.jsonl: response
REFERENCE_FIELDS = ("reference", "output")


def read_predictions(predictions: str | Path,
                     references: str | Path | None = None) -> tuple[list[str], list[str]]:
    """Predictions and their references, in order.

    One JSONL file holds both (``response`` and ``reference`` or ``output`` on each line, as
    ``test_responses.jsonl`` does); with ``references``, each file is either JSONL (the field of
    its side) or plain text, one item per line.  Different lengths are a ``DataError``.
    """
    if references is None:
        if not is_jsonl(predictions):
            raise DataError(f"{predictions} is not JSONL, so it holds no references",
                            "pass --references FILE with one reference per line")
        records = list(enumerate(read_jsonl(predictions, "predictions file"), 1))
        return ([str(pick_field(r, RESPONSE_FIELDS, f"{predictions}:{i}")) for i, r in records],
                [str(pick_field(r, REFERENCE_FIELDS, f"{predictions}:{i}")) for i, r in records])
    sides = []
    for path, fields, what in ((predictions, RESPONSE_FIELDS, "predictions file"),
                               (references, REFERENCE_FIELDS, "references file")):
        if Path(path).is_file() and is_jsonl(path):
            sides.append([str(pick_field(r, fields, f"{path}:{i}"))
                          for i, r in enumerate(read_jsonl(path, what), 1)])
        else:
            sides.append(read_lines(path, what))
    if len(sides[0]) != len(sides[1]):
        raise DataError(f"{predictions} has {len(sides[0])} items but {references} has {len(sides[1])}",
                        "give one reference per prediction, in the same order")
    return sides[0], sides[1]
