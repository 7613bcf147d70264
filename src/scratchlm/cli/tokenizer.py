"""Train a byte-level BPE tokenizer, or encode and decode text with any tokenizer.

  scratchlm tokenizer train --data builtin:tinyshakespeare --vocab-size 4096 --out runs/tokenizer
  echo "Hello, world" | scratchlm tokenizer encode --tokenizer runs/tokenizer
  echo "15496 11 995" | scratchlm tokenizer decode --tokenizer path/to/gpt2

--tokenizer takes a directory with tokenizer.json (ours or Hugging Face's), GPT-2's encoder.json +
vocab.bpe, a saved word/char tokenizer, a run directory with a tokenizer/ folder, or a .gguf file.
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_DIR = "runs/tokenizer"


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults, and keep the description's example lines as written."""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = _Formatter
    actions = parser.add_subparsers(dest="action", metavar="ACTION", title="actions")
    formatter = _Formatter

    train = actions.add_parser("train", help="train a byte-level BPE tokenizer and write DIR/tokenizer.json",
                               description="Train a byte-level BPE tokenizer, saved as tokenizer.json.",
                               formatter_class=formatter)
    train.add_argument("--data", default="builtin:tinyshakespeare", metavar="PATH",
                       help="training text: a UTF-8 file, or builtin:the-verdict / builtin:tinyshakespeare")
    train.add_argument("--vocab-size", type=int, default=4096, metavar="N",
                       help="tokens in the vocabulary: 256 bytes + merges + special tokens")
    train.add_argument("--out", default=DEFAULT_DIR, metavar="DIR",
                       help="directory to write tokenizer.json into")
    train.add_argument("--pattern", choices=["gpt2", "gpt4"], default="gpt4",
                       help="split regex applied before merging: GPT-2's or GPT-4's (cl100k)")
    train.add_argument("--special-tokens", nargs="*", default=["<|endoftext|>"], metavar="TOKEN",
                       help="special tokens appended after the merges (none: pass the flag with no value)")
    train.add_argument("--no-progress", action="store_true", default=False, help="hide the progress bar")
    train.set_defaults(func=run_train)

    encode = actions.add_parser("encode", help="text (file or stdin) -> space-separated token ids",
                                description="Encode text into token ids, printed on one line.",
                                formatter_class=formatter)
    encode.add_argument("--tokenizer", default=DEFAULT_DIR, metavar="REF", help="tokenizer directory or file")
    encode.add_argument("--allowed-special", default="none", metavar="NAMES",
                        help="special-token strings to encode as special tokens: 'all', 'none', or a "
                             "comma-separated list; any other special-token string in the text is an error")
    encode.add_argument("file", nargs="?", default="-", metavar="FILE",
                        help="text file to encode ('-': stdin)")
    encode.set_defaults(func=run_encode)

    decode = actions.add_parser("decode", help="token ids (file or stdin) -> text",
                                description="Decode whitespace-separated token ids back into text.",
                                formatter_class=formatter)
    decode.add_argument("--tokenizer", default=DEFAULT_DIR, metavar="REF", help="tokenizer directory or file")
    decode.add_argument("file", nargs="?", default="-", metavar="FILE", help="file of token ids ('-': stdin)")
    decode.set_defaults(func=run_decode)


def _read_input(ref: str) -> str:
    """The exact text of a file or stdin (bytes decoded as UTF-8; no newline translation)."""
    from pathlib import Path

    from scratchlm.errors import DataError

    if ref == "-":
        data, name = sys.stdin.buffer.read(), "stdin"
    else:
        path = Path(ref).expanduser()
        try:
            data, name = path.read_bytes(), str(path)
        except FileNotFoundError:
            raise DataError(f"input file not found: {path}",
                            "check the path, or pipe the text on stdin") from None
        except IsADirectoryError:
            raise DataError(f"{path} is a directory", "pass a file, or pipe the text on stdin") from None
        except OSError as err:
            raise DataError(f"cannot read {path}: {err.strerror}", "check the file's permissions") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{name} is not UTF-8 text ({err.reason} at byte {err.start})",
                        "convert it to UTF-8") from None


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run_encode(args: argparse.Namespace) -> int:
    from scratchlm.tokenizers import load

    tokenizer = load(args.tokenizer)
    allowed = args.allowed_special.strip()
    if allowed == "all":
        allowed_special = "all"
    elif allowed in ("", "none"):
        allowed_special = set()
    else:
        allowed_special = {name.strip() for name in allowed.split(",") if name.strip()}
    ids = tokenizer.encode(_read_input(args.file), allowed_special=allowed_special)
    _write(" ".join(map(str, ids)) + "\n")
    return 0


def run_decode(args: argparse.Namespace) -> int:
    from scratchlm.errors import DataError
    from scratchlm.tokenizers import load

    tokenizer = load(args.tokenizer)
    ids = []
    for position, item in enumerate(_read_input(args.file).split(), start=1):
        try:
            ids.append(int(item))
        except ValueError:
            raise DataError(f"item {position} of the input, {item[:40]!r}, is not a token id",
                            "pass whitespace-separated integers, as 'scratchlm tokenizer encode' "
                            "prints them") from None
    _write(tokenizer.decode(ids))
    return 0


def run_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from scratchlm.data.corpora import read_corpus
    from scratchlm.tokenizers.train_bpe import train_bpe_from_corpus

    tokenizer = train_bpe_from_corpus(args.data, args.vocab_size, pattern=args.pattern,
                                      special_tokens=tuple(args.special_tokens),
                                      progress=not args.no_progress)
    out = Path(args.out)
    tokenizer.save(out)
    sample = read_corpus(args.data)[:200_000]
    ids = tokenizer.encode(sample, allowed_special="all")
    print(f"wrote {out / 'tokenizer.json'}: {tokenizer.vocab_size:,} tokens "
          f"({len(tokenizer.merges):,} merges, special: {', '.join(tokenizer.special_tokens) or 'none'}); "
          f"{len(sample) / max(len(ids), 1):.2f} characters per token on {args.data}")
    return 0
