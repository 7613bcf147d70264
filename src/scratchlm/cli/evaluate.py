"""Evaluate a model.  'perplexity': sliding-window perplexity of a text, also in nats and bits per
character (comparable across tokenizers).  The model is anything scratchlm.load opens: a run dir
from 'scratchlm pretrain', a Hugging Face model directory or hub id, or a .gguf file.
"""

from __future__ import annotations

import argparse
import json

from scratchlm.cli.options import add_model_options, load_model
from scratchlm.data.splits import SPLITS, select_split
from scratchlm.errors import ConfigError


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(title="evaluations", metavar="EVAL")
    p = sub.add_parser("perplexity", help="sliding-window perplexity of a text",
                       description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_options(p)
    p.add_argument("--data", required=True, default=argparse.SUPPRESS, metavar="PATH",
                   help="UTF-8 text file or builtin:NAME (e.g. builtin:tinyshakespeare)")
    p.add_argument("--split", choices=SPLITS, default="all",
                   help="the whole text, or the train (first 90%%) / val (last 10%%) split of 'pretrain'")
    p.add_argument("--context-length", type=int, default=None,
                   help="tokens per window; None = the model's context length")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens the window advances; None = half the context (smaller: closer to the "
                        "true perplexity, slower)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=run_perplexity)


def run_perplexity(args: argparse.Namespace) -> int:
    from scratchlm.data.corpora import read_corpus
    from scratchlm.evaluation.perplexity import perplexity

    text = select_split(read_corpus(args.data), args.split)
    lm = load_model(args)
    if lm.tokenizer is None:
        raise ConfigError(f"{args.model} has no tokenizer, so its text cannot be scored",
                          "pass a model directory that includes tokenizer files")
    result = perplexity(lm.model, lm.tokenizer, text, context_length=args.context_length, stride=args.stride,
                        batch_size=args.batch_size)
    if args.json:
        record = {"model": str(args.model), "data": args.data, "split": args.split, **result.to_dict()}
        print(json.dumps(record))
        return 0
    print(f"model          {args.model}\ndata           {args.data} ({args.split}: {result.characters:,} "
          f"characters, {result.tokens:,} tokens scored)\nwindow         {result.context_length} tokens, "
          f"stride {result.stride}\nloss           {result.loss:.4f} nats/token\nperplexity     "
          f"{result.perplexity:.3f}\nnats/char      {result.nats_per_char:.4f}\nbits/char      "
          f"{result.bits_per_char:.4f}")
    return 0
