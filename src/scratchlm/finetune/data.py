"""Labelled texts for classification: reading, balancing, splitting (Raschka ch. 6's preparation).

Files: TSV or CSV with ``label<separator>text`` (a header row ``label,text`` is recognised and
skipped), or JSONL with ``{"text": ..., "label": ...}``.  Labels are strings; the label set is
the sorted distinct labels of the training split, saved with the model.
"""

from __future__ import annotations

import csv
import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from scratchlm.errors import DataError


@dataclass(frozen=True)
class LabelledText:
    text: str
    label: str


def read_labelled(path: str | Path) -> list[LabelledText]:
    """The examples of a TSV, CSV or JSONL file; a row without a label or text is a ``DataError``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}", "pass a TSV/CSV (label, text) or JSONL file")
    raw = path.read_text(encoding="utf-8", errors="strict")
    if not raw.strip():
        raise DataError(f"{path} is empty", "pass a file with one labelled text per line")
    if path.suffix.lower() in (".jsonl", ".json"):
        return _read_jsonl(path, raw)
    delimiter = "," if path.suffix.lower() == ".csv" else "\t"
    rows = list(csv.reader(raw.splitlines(), delimiter=delimiter, quoting=csv.QUOTE_MINIMAL
                           if delimiter == "," else csv.QUOTE_NONE))
    if rows and [cell.strip().lower() for cell in rows[0][:2]] == ["label", "text"]:
        rows = rows[1:]
    examples = []
    for number, row in enumerate(rows, start=1):
        if not row or not any(cell.strip() for cell in row):
            continue
        label, text = (row[0].strip(), delimiter.join(row[1:]).strip()) if len(row) > 1 else (row[0], "")
        if not label or not text:
            raise DataError(f"{path}, row {number}: a row needs a label and a text, separated by "
                            f"{'a comma' if delimiter == ',' else 'a tab'}", "fix or remove the row")
        examples.append(LabelledText(text, label))
    return examples


def _read_jsonl(path: Path, raw: str) -> list[LabelledText]:
    examples = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}, line {number}: not JSON", "write one JSON object per line") from None
        text = item.get("text") if isinstance(item, dict) else None
        label = item.get("label") if isinstance(item, dict) else None
        if not isinstance(text, str) or not text.strip() or label is None or str(label).strip() == "":
            raise DataError(f"{path}, line {number}: an item needs a \"text\" and a \"label\"",
                            'write {"text": "...", "label": "..."}')
        examples.append(LabelledText(text, str(label)))
    return examples


def balance(examples: Sequence[LabelledText], seed: int) -> list[LabelledText]:
    """Undersample every class to the size of the smallest (Raschka's balanced SMS spam set), in a
    seeded order."""
    by_label: dict[str, list[LabelledText]] = {}
    for example in examples:
        by_label.setdefault(example.label, []).append(example)
    smallest = min(len(group) for group in by_label.values())
    rng = random.Random(seed)
    kept = [x for label in sorted(by_label) for x in rng.sample(by_label[label], smallest)]
    return kept


def split(examples: Sequence[LabelledText], fractions: Sequence[float],
          seed: int) -> tuple[list[LabelledText], list[LabelledText], list[LabelledText]]:
    """Shuffle with ``seed`` and cut into train / validation / test by ``fractions`` (Raschka: 0.7/0.1/0.2;
    the test split takes what the first two leave)."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise DataError(f"--split {','.join(f'{f:g}' for f in fractions)}: three fractions that add up to 1",
                        "e.g. --split 0.7,0.1,0.2")
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    n_train = int(len(shuffled) * fractions[0])
    n_val = int(len(shuffled) * fractions[1])
    return shuffled[:n_train], shuffled[n_train:n_train + n_val], shuffled[n_train + n_val:]


def label_set(train: Sequence[LabelledText], *others: Sequence[LabelledText]) -> list[str]:
    """The sorted labels of the training split; a split with a label training never saw is an error."""
    labels = sorted({x.label for x in train})
    if len(labels) < 2:
        found = labels[0] if labels else "none"
        raise DataError(f"the training data has one class only ({found})",
                        "a classifier needs examples of two or more labels")
    known = set(labels)
    for part in others:
        unseen = Counter(x.label for x in part if x.label not in known)
        if unseen:
            label, count = unseen.most_common(1)[0]
            raise DataError(f"label {label!r} ({count} examples) is not in the training split",
                            "add training examples of it, or change the split (--split/--seed)")
    return labels
