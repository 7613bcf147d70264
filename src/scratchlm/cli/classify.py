"""Label texts with a classifier run dir (written by 'scratchlm finetune classify').

--text for one text, --file for many (one per line, or JSONL with a "text" field); prints each
text's label and its probability, or one JSON object per text with --json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scratchlm.cli.options import add_model_options, load_model
from scratchlm.errors import DataError


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", action="append", default=argparse.SUPPRESS, metavar="TEXT",
                        help="a text to label (repeatable)")
    source.add_argument("--file", default=argparse.SUPPRESS, metavar="FILE",
                        help="texts to label: one per line, or JSONL objects with a \"text\" field")
    parser.add_argument("--batch-size", type=int, default=16, help="texts per forward pass")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per text: text, label, probability")
    parser.set_defaults(func=run)


def read_texts(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}", "pass a text file (one text per line) or JSONL")
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix.lower() == ".jsonl":
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{path}, line {number}: not JSON",
                                "write one JSON object per line") from None
            if not isinstance(item, dict) or not isinstance(item.get("text"), str):
                raise DataError(f"{path}, line {number}: no \"text\" field", 'write {"text": "..."}')
            texts.append(item["text"])
        else:
            texts.append(line)
    if not texts:
        raise DataError(f"{path} has no texts", "write one text per line")
    return texts


def run(args: argparse.Namespace) -> int:
    texts = list(args.text) if "text" in args else read_texts(args.file)
    lm = load_model(args)
    for text, (label, prob) in zip(texts, lm.classify(texts, batch_size=args.batch_size), strict=True):
        if args.json:
            print(json.dumps({"text": text, "label": label, "probability": round(prob, 6)}))
        else:
            print(f"{label}\t{prob:.4f}\t{text}")
    return 0
