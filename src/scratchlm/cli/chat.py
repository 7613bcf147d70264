"""Chat with a model in the terminal: streaming answers through its chat template, with history.

Type a message and press Enter.  /reset forgets the conversation, /save FILE writes it as JSON,
/help lists the commands.  Ctrl-C stops the answer being written; Ctrl-D quits.
"""

from __future__ import annotations

import argparse

from scratchlm.generation.sampling import SamplingParams


def configure(parser: argparse.ArgumentParser) -> None:
    d = SamplingParams()  # one source of defaults for the CLI, the API and the server
    parser.add_argument("--model", required=True, default=argparse.SUPPRESS,
                        help="run dir, Hugging Face model directory or hub id, or a .gguf file")
    parser.add_argument("--system", default=None, help="system message that opens the conversation")
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                        help="most tokens per answer")
    parser.add_argument("--temperature", type=float, default=0.7,
                        help="softmax temperature; 0 = greedy (always the most likely token)")
    parser.add_argument("--top-k", type=int, default=d.top_k,
                        help="sample only among the k most likely tokens; None = off")
    parser.add_argument("--top-p", type=float, default=0.9,
                        help="sample only among the most likely tokens that together reach this probability")
    parser.add_argument("--frequency-penalty", type=float, default=d.frequency_penalty,
                        help="subtract this × (times the token was generated) from its logit")
    parser.add_argument("--presence-penalty", type=float, default=d.presence_penalty,
                        help="subtract this from the logit of every token generated already")
    parser.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty,
                        help="divide (positive) or multiply (negative) the logits of tokens seen already; "
                        "1 = off")
    parser.add_argument("--seed", type=int, default=d.seed,
                        help="random seed, for reproducible answers; None = a fresh one")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="keep generating past the end of the turn (up to --max-new-tokens)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1, ...; None = cuda if available, else cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="weight precision; None = float32")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    params = SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty,
        repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
        ignore_eos=args.ignore_eos, seed=args.seed,
    )
    from scratchlm.api import load
    from scratchlm.serving.chat import ChatSession

    lm = load(args.model, device=args.device, dtype=args.dtype)
    ChatSession(lm, params, system=args.system).run()
    return 0
