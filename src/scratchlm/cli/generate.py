"""Continue a prompt with a model, streaming the text to the terminal as it is generated.

The model is anything ``scratchlm.load`` opens: a run dir from ``scratchlm pretrain``, a Hugging
Face model directory, or a hub id.  The prompt comes from --prompt, or from standard input; with
--chat the text is asked as a user message through the model's chat template instead.
"""

from __future__ import annotations

import argparse
import sys

from scratchlm.errors import UserError
from scratchlm.generation.sampling import SamplingParams


def configure(parser: argparse.ArgumentParser) -> None:
    d = SamplingParams()  # one source of defaults for the CLI, the API and the server
    # (SUPPRESS: a required option has no default worth printing.)
    parser.add_argument("--model", required=True, default=argparse.SUPPRESS,
                        help="run dir, Hugging Face model directory, or hub id (e.g. openai-community/gpt2)")
    parser.add_argument("--prompt", default=None, help="text to continue; None = read standard input")
    parser.add_argument("--chat", default=None, metavar="TEXT",
                        help="answer TEXT as a user message, through the model's chat template "
                        "(ChatML when it has none), stopping at the end of the turn")
    parser.add_argument("--system", default=None, metavar="TEXT",
                        help="with --chat: a system message before it; None = the template's default")
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                        help="most tokens to generate")
    parser.add_argument("--temperature", type=float, default=d.temperature,
                        help="softmax temperature; 0 = greedy (always the most likely token)")
    parser.add_argument("--top-k", type=int, default=d.top_k,
                        help="sample only among the k most likely tokens; None = off")
    parser.add_argument("--top-p", type=float, default=d.top_p,
                        help="sample only among the most likely tokens that together reach this probability")
    parser.add_argument("--frequency-penalty", type=float, default=d.frequency_penalty,
                        help="subtract this × (times the token was generated) from its logit")
    parser.add_argument("--presence-penalty", type=float, default=d.presence_penalty,
                        help="subtract this from the logit of every token generated already")
    parser.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty,
                        help="divide (positive) or multiply (negative) the logits of tokens seen already; "
                        "1 = off")
    parser.add_argument("--seed", type=int, default=d.seed,
                        help="random seed, for a reproducible sample; None = a fresh one")
    parser.add_argument("--stop", action="append", default=argparse.SUPPRESS, metavar="TEXT",
                        help="end the text before this string (repeatable; none by default)")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="keep generating past the end-of-text token")
    parser.add_argument("--echo", action="store_true", help="print the prompt before the continuation")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1, ...; None = cuda if available, else cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="weight precision; None = float32")
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
    params = SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty,
        repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
        stop=getattr(args, "stop", []), ignore_eos=args.ignore_eos, seed=args.seed,
    )
    from scratchlm.api import load

    lm = load(args.model, device=args.device, dtype=args.dtype)
    if args.chat is not None:
        messages = [{"role": "system", "content": args.system}] if args.system is not None else []
        messages.append({"role": "user", "content": args.chat})
        prompt, pieces = lm.chat_prompt(messages), lm.chat_stream(messages, params)
    else:
        pieces = lm.stream(prompt, params)
    out = sys.stdout
    if args.echo:
        out.write(prompt)
        out.flush()
    last = prompt if args.echo else ""
    for piece in pieces:
        out.write(piece)
        out.flush()
        last = piece
    if out.isatty() and not last.endswith("\n"):
        out.write("\n")  # leave the shell prompt on a line of its own
    return 0
