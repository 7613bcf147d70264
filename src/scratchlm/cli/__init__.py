"""The ``scratchlm`` command: one entry point, one module per subcommand.

Start-up is kept fast: the top-level help is built from the table below without importing any
subcommand module, and each module imports torch (or anything heavy) only inside the function
that runs the command.  A subcommand module exposes ``configure(parser)``, which adds its options
(or its own sub-subcommands) and sets ``func`` via ``parser.set_defaults(func=...)``.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys

from scratchlm.errors import UserError

# name -> (module, one-line help).  Order is the order shown in --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("scratchlm.cli.pretrain", "pretrain a language model (no options: the 5-minute demo)"),
    "finetune": ("scratchlm.cli.finetune", "finetune a pretrained model (classify: a text classifier)"),
    "classify": ("scratchlm.cli.classify", "label texts with a classifier trained by 'finetune classify'"),
    "generate": ("scratchlm.cli.generate", "continue a prompt, or answer a chat message, streaming"),
    "chat": ("scratchlm.cli.chat", "chat with a model in the terminal, streaming, with history"),
    "serve": ("scratchlm.cli.serve", "serve a model over an OpenAI-compatible HTTP API"),
    "eval": ("scratchlm.cli.evaluate", "perplexity, ROUGE, multiple choice, ranking, LLM judge, report"),
    "tokenizer": ("scratchlm.cli.tokenizer", "train a BPE tokenizer, encode or decode text"),
    "convert": ("scratchlm.cli.convert", "convert a model: Hugging Face or GGUF <-> scratchlm run dir"),
    "presets": ("scratchlm.cli.presets", "list the named model presets with parameter counts"),
}


def _top_parser() -> argparse.ArgumentParser:
    lines = [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    parser = argparse.ArgumentParser(
        prog="scratchlm",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Language models from scratch: tokenize, train, generate, evaluate.",
        epilog="commands:\n" + "\n".join(lines)
        + "\n\nRun 'scratchlm COMMAND --help' for a command's options.",
        usage="scratchlm [-h] [--version] COMMAND [options]",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    return parser


def build_parser(name: str) -> argparse.ArgumentParser:
    """The full parser of one subcommand (imports its module, which must stay light)."""
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(
        prog=f"scratchlm {name}",
        description=(module.__doc__ or help_).strip(),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    module.configure(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        _top_parser().print_help()
        return 0
    if argv[0] == "--version":
        from scratchlm import __version__

        print(f"scratchlm {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "run 'scratchlm --help' for the list"
        print(f"error: unknown command {name!r} — {hint}", file=sys.stderr)
        return 2
    parser = build_parser(name)
    args = parser.parse_args(argv[1:])
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `scratchlm ... | head`: the reader went away; that is not an error.
        sys.stderr.close()
        return 0
