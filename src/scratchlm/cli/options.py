"""Options shared by the commands that load a model (generate, chat, serve, eval), and LoRA's
(the finetuning commands).

One place for their names, help texts and defaults, so the CLI, the API and the server agree.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from scratchlm.api import DTYPES, LM, QUANT_DTYPES
from scratchlm.finetune.lora_config import ALL_LINEAR, LoRAConfig
from scratchlm.generation.sampling import SamplingParams
from scratchlm.runtime import set_threads


def load_model(args: argparse.Namespace) -> LM:
    """``scratchlm.load`` with the options of ``add_model_options`` (threads set first)."""
    from scratchlm.api import load

    set_threads(args.threads)
    return load(args.model, device=args.device, dtype=args.dtype, adapter=args.adapter,
                quantize=getattr(args, "quantize", None))


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model, --adapter, --device, --dtype: what ``scratchlm.load`` takes; --threads (``load_model``)."""
    # (SUPPRESS: a required option has no default worth printing.)
    parser.add_argument("--model", required=True, default=argparse.SUPPRESS,
                        help="run dir, Hugging Face model directory or hub id, or a .gguf file")
    parser.add_argument("--adapter", default=None, metavar="DIR",
                        help="a PEFT LoRA adapter directory (adapter_config.json + "
                        "adapter_model.safetensors) to apply to --model; None = the model as it is")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1, ...; None = cuda if available, else cpu")
    parser.add_argument("--dtype", default=None, metavar="{" + ",".join(DTYPES + QUANT_DTYPES[:1]) + "}",
                        help="weight precision; None = float32.  On the CPU, float16 keeps fp16 weights "
                        "(fp32 arithmetic); gguf keeps a .gguf file's own Q8_0/Q4_0/Q4_1/Q4_K/Q6_K blocks "
                        "and computes with them in place: the least memory and the fastest (SmolLM2's "
                        "Q4_1 decodes 4x as fast as float16, docs/benchmarks.md), each token's "
                        "activations rounded per block of 32 to 15 bits as llama.cpp rounds to 8 "
                        "(SCRATCHLM_ACTIVATIONS=fp32: exact, slower)")
    parser.add_argument("--quantize", default=None, choices=QUANT_DTYPES[1:],
                        help="round the weight matrices into GGUF blocks at load, as llama.cpp does, and "
                        "compute as --dtype gguf does (CPU inference); None = keep them as loaded")
    parser.add_argument("--threads", type=int, default=0, metavar="N",
                        help="CPU threads; 0 = PyTorch's default, one per core (on cores shared with other "
                        "jobs, fewer can be much faster)")


def add_sampling_options(parser: argparse.ArgumentParser, *, temperature: float | None = None,
                         top_p: float | None = None, stop: bool = True) -> None:
    """The ``SamplingParams`` fields as options; defaults come from SamplingParams unless given."""
    d = SamplingParams()
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                        help="most tokens to generate")
    temperature = d.temperature if temperature is None else temperature
    parser.add_argument("--temperature", type=float, default=temperature,
                        help="softmax temperature; 0 = greedy (always the most likely token)")
    parser.add_argument("--top-k", type=int, default=d.top_k,
                        help="sample only among the k most likely tokens; None = off")
    parser.add_argument("--top-p", type=float, default=d.top_p if top_p is None else top_p,
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
    if stop:
        parser.add_argument("--stop", action="append", default=argparse.SUPPRESS, metavar="TEXT",
                            help="end the text before this string (repeatable; none by default)")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="keep generating past the end-of-text (or end-of-turn) token")


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty,
        repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
        stop=getattr(args, "stop", []), ignore_eos=args.ignore_eos, seed=args.seed,
    )


def add_lora_options(parser: argparse.ArgumentParser, defaults: LoRAConfig | None = None) -> None:
    """--lora-rank, --lora-alpha, --lora-dropout, --lora-targets (``lora_config_from_args``).

    Defaults are ``defaults`` (a recipe's) or ``LoRAConfig``'s (peft's).  An option not given is
    absent from the namespace (``argparse.SUPPRESS``), so a resumed run keeps the values it saved.
    """
    d = defaults or LoRAConfig()
    s = argparse.SUPPRESS
    parser.add_argument("--lora-rank", type=int, default=s, metavar="R",
                        help=f"rank of each LoRA adapter (A is R x in, B is out x R; default: {d.rank})")
    parser.add_argument("--lora-alpha", type=float, default=s,
                        help=f"LoRA alpha: the update B A is scaled by alpha / rank, as in peft "
                        f"(default: {d.alpha:g})")
    parser.add_argument("--lora-dropout", type=float, default=s,
                        help="dropout on the adapters' input (the base layer sees the input unchanged; "
                        f"default: {d.dropout:g})")
    parser.add_argument("--lora-targets", default=s, metavar="NAMES",
                        help="comma-separated Hugging Face module names to adapt, as peft names them: "
                        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj (Llama family), "
                        f"c_attn,attn.c_proj,c_fc,mlp.c_proj (GPT-2), lm_head; {ALL_LINEAR} = every linear "
                        f"layer of the blocks (default: {','.join(d.targets)})")


def lora_config_from_args(given: Mapping[str, Any], defaults: LoRAConfig | None = None) -> LoRAConfig:
    """The ``LoRAConfig`` of ``add_lora_options``' options given over ``defaults`` (a bad value is a
    one-line ConfigError)."""
    d = defaults or LoRAConfig()
    return LoRAConfig(rank=given.get("lora_rank", d.rank), alpha=given.get("lora_alpha", d.alpha),
                      dropout=given.get("lora_dropout", d.dropout),
                      targets=given.get("lora_targets", d.targets))
