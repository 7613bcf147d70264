"""Chat with a model in the terminal: streaming answers through its chat template, with history.

Type a message and press Enter.  /reset forgets the conversation, /save FILE writes it as JSON,
/help lists the commands.  Ctrl-C stops the answer being written; Ctrl-D quits.
"""

from __future__ import annotations

import argparse

from scratchlm.cli.options import add_model_options, add_sampling_options, load_model, sampling_from_args


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    parser.add_argument("--system", default=None, help="system message that opens the conversation")
    add_sampling_options(parser, temperature=0.7, top_p=0.9, stop=False)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    params = sampling_from_args(args)
    from scratchlm.serving.chat import ChatSession

    lm = load_model(args)
    ChatSession(lm, params, system=args.system).run()
    return 0
