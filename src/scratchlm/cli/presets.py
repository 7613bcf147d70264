"""List the named model presets: layers, heads, width, context, vocabulary and parameter count.

Counts are computed from each config alone (tied embeddings counted once), so listing even the
largest preset neither imports torch nor allocates a weight.  Count-based n-gram presets show
"-" for parameters (a fitted model stores one count per distinct n-gram of its training text:
ngram-kn5 on tinyshakespeare, 194,505) and, as context, the N-1 tokens they read.
"""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--filter", default="", metavar="TEXT",
                        help="show only presets whose name contains TEXT")
    parser.set_defaults(func=run)


def format_table(names: list[str]) -> str:
    """The preset table as text: one header line, one line per preset."""
    from scratchlm.models.config import from_preset

    header = ("preset", "layers", "heads", "kv heads", "width", "context", "vocab", "parameters")
    rows = [header]
    for name in names:
        c = from_preset(name)
        if c.arch == "ngram":  # no layers or widths; it reads N-1 tokens; its counts come from the data
            rows.append((name, "-", "-", "-", "-", str(c.ngram_order - 1), str(c.vocab_size), "-"))
            continue
        attention = c.arch == "transformer"  # recurrent LMs have no heads
        heads = (str(c.n_head), str(c.n_kv_head)) if attention else ("-", "-")
        rows.append((name, str(c.n_layer), *heads, str(c.n_embd),
                     str(c.context_length), str(c.vocab_size), f"{c.num_parameters():,}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    def line(row: tuple[str, ...]) -> str:  # name left-aligned, numbers right-aligned
        cells = zip(row, widths, strict=True)
        return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(cells))

    return "\n".join(line(row) for row in rows)


def run(args: argparse.Namespace) -> int:
    from scratchlm.errors import ConfigError
    from scratchlm.models.config import list_presets

    names = [name for name in list_presets() if args.filter in name]
    if not names:
        raise ConfigError(f"no preset name contains {args.filter!r}",
                          "run 'scratchlm presets' for the full list")
    print(format_table(names))
    return 0
