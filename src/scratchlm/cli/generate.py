"""Continue a prompt with a model, streaming the text to the terminal as it is generated.

The model is anything ``scratchlm.load`` opens: a run dir from ``scratchlm pretrain``, a Hugging
Face model directory, or a hub id.  The prompt comes from --prompt, or from standard input; with
--chat the text is asked as a user message through the model's chat template instead.
The output ends with a newline; when the model generates nothing (a chat model given a plain
prompt often ends its text at once), a note on standard error says so and what to try.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from scratchlm.cli.options import add_model_options, add_sampling_options, load_model, sampling_from_args
from scratchlm.errors import UserError


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    parser.add_argument("--prompt", default=None, help="text to continue; None = read standard input")
    parser.add_argument("--chat", default=None, metavar="TEXT",
                        help="answer TEXT as a user message, through the model's chat template "
                        "(ChatML when it has none), stopping at the end of the turn")
    parser.add_argument("--system", default=None, metavar="TEXT",
                        help="with --chat: a system message before it; None = the template's default")
    add_sampling_options(parser)
    parser.add_argument("--echo", action="store_true", help="print the prompt before the continuation")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.chat is not None and args.prompt is not None:
        raise UserError("--prompt and --chat both given", "pass --prompt to continue text, or --chat to ask")
    if args.system is not None and args.chat is None:
        raise UserError("--system needs --chat", "pass the question with --chat TEXT")
    prompt = args.prompt
    if prompt is None and args.chat is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise UserError("no prompt given", "pass --prompt TEXT, or pipe the prompt into standard input")
        prompt = sys.stdin.read()
    params = sampling_from_args(args)

    lm = load_model(args)
    if args.chat is not None:
        messages = [{"role": "system", "content": args.system}] if args.system is not None else []
        messages.append({"role": "user", "content": args.chat})
        prompt, pieces = lm.chat_prompt(messages), lm.chat_stream(messages, params)
    else:
        pieces = lm.stream(prompt, params)
    out = sys.stdout
    written = prompt if args.echo else ""  # its tail: what the last line ends with
    if written:
        out.write(written)
        out.flush()
    generated = False
    for piece in pieces:
        if piece:
            out.write(piece)
            out.flush()
            written, generated = piece, True
    if written and not written.endswith("\n"):
        out.write("\n")  # a text file's last line ends in one, and the shell prompt starts a new line
    if not generated:
        print(f"note: {_nothing_generated(args, lm)}", file=sys.stderr)
    return 0


def _nothing_generated(args: argparse.Namespace, lm: Any) -> str:
    """What to say when the model's first token ended the text: what happened — what to try."""
    if args.chat is not None:
        return ("nothing generated: the model ended its turn at once — try another message, a higher "
                "--temperature, or --ignore-eos")
    if lm.chat_template is not None:
        return ("nothing generated: the model ended the text at once — it is a chat model: pass the "
                "message with --chat TEXT instead of --prompt")
    return ("nothing generated: the model ended the text at once — if it is a chat model, pass the "
            "message with --chat TEXT; to continue past the end of text, add --ignore-eos")
