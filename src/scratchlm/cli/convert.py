"""Convert a model between a Hugging Face directory (or hub id) or a .gguf file, and a scratchlm run dir;
or write a .gguf file.

--to run writes a run dir (config.json, model.safetensors, tokenizer/) that every scratchlm
command opens, pretraining and finetuning included.  --to hf writes config.json,
model.safetensors, generation_config.json and the tokenizer files (chat template included) that
transformers' AutoModelForCausalLM.from_pretrained loads with the same logits.  A GGUF file is
dequantized on the way, so the output holds full-precision weights.  --to gguf writes OUT as a
llama.cpp .gguf file (GPT-2, Llama, Qwen2 and Qwen3 configs, as llama.cpp's gpt2, llama, qwen2 and
qwen3 architectures; tokenizer and chat template in its metadata) with the weight matrices in
--quant's type, which llama.cpp, transformers and scratchlm load.

OUT is written beside its final place and renamed into it at the end, so an interrupted
conversion never leaves half a model; an OUT that is not empty is replaced only with --force.
--adapter DIR --merge-adapter folds a PEFT LoRA adapter into the weights on the way.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from scratchlm.checkpoint.atomic import atomic_dir
from scratchlm.errors import UserError

FORMATS = ("run", "hf", "gguf")
GGUF_QUANTS = ("f32", "f16", "q8_0", "q4_0", "q4_1")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC",
                        help="the model: a Hugging Face directory or hub id, a .gguf file, or a run dir")
    parser.add_argument("out", metavar="OUT", help="the directory to write (with --to gguf: the .gguf file)")
    parser.add_argument("--to", choices=FORMATS, default=None,
                        help="output format: run (scratchlm run dir), hf (Hugging Face directory) or gguf "
                        "(llama.cpp file, architecture gpt2, llama, qwen2 or qwen3); None = gguf for an OUT "
                        "ending in .gguf, else hf for a run dir, run for anything else")
    parser.add_argument("--quant", choices=GGUF_QUANTS, default="f16",
                        help="--to gguf: the type of the weight matrices (norms and biases stay f32)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="precision of the written weights")
    parser.add_argument("--adapter", default=None, metavar="DIR",
                        help="a PEFT LoRA adapter directory to apply to SRC (needs --merge-adapter)")
    parser.add_argument("--merge-adapter", action="store_true",
                        help="fold the LoRA adapter (from --adapter) into the weights, so OUT holds plain "
                        "weights that need no adapter")
    parser.add_argument("--force", action="store_true", help="replace OUT even when it is not empty")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from scratchlm.checkpoint.io import is_run_dir

    src, out = args.src, Path(args.out).expanduser()
    target = args.to or ("gguf" if out.suffix == ".gguf" else "hf" if is_run_dir(src) else "run")
    if target == "gguf":
        if out.is_dir():
            raise UserError(f"{out} is a directory", "--to gguf writes a file: give OUT as NAME.gguf")
        if out.exists() and not args.force:
            raise UserError(f"{out} exists", "pass --force to replace it, or choose another OUT")
        convert(src, out, "gguf", adapter=args.adapter, merge_adapter=args.merge_adapter, quant=args.quant)
        print(f"wrote {out} (GGUF, {args.quant} weights, {out.stat().st_size / 2**20:.1f} MiB)")
        return 0
    _check_out(Path(src).expanduser(), out, args.force)
    target = args.to or ("hf" if is_run_dir(src) else "run")
    written = convert(src, out, target, dtype=args.dtype, adapter=args.adapter,
                      merge_adapter=args.merge_adapter, quant=args.quant)
    print(f"wrote {out} ({'Hugging Face' if target == 'hf' else 'run dir'}: {', '.join(written)})")
    return 0


def convert(src: str | Path, out: str | Path, to: str, dtype: str = "float32",
            adapter: str | Path | None = None, merge_adapter: bool = False,
            quant: str = "f16") -> list[str]:
    """Write the model at ``src`` to the directory ``out`` in format ``to`` (``run`` or ``hf``), or
    to the file ``out`` (``gguf``, weight matrices in ``quant``).

    ``adapter``: a PEFT LoRA adapter directory applied to ``src``; both formats hold plain
    weights, so a model with an adapter is written only with ``merge_adapter`` (folded in, in
    float32, before any cast).  Replaces ``out`` if it exists (the CLI asks for --force first).
    Returns the names written.
    """
    import torch

    from scratchlm.api import load
    from scratchlm.finetune.lora import has_lora, merge_lora

    if to not in FORMATS:
        raise UserError(f"unknown output format {to!r}", f"use one of {', '.join(FORMATS)}")
    out = Path(out)
    lm = load(src, device="cpu", adapter=adapter)  # float32: the exact values, cast once below if asked
    if has_lora(lm.model):
        if not merge_adapter:
            raise UserError(f"{src} carries a LoRA adapter, and the {to} format holds plain weights",
                            "pass --merge-adapter to fold it into the weights")
        merge_lora(lm.model)
    elif merge_adapter:
        raise UserError("--merge-adapter given, but the model has no adapter",
                        "pass the adapter directory with --adapter DIR")
    if to == "gguf":
        from scratchlm.checkpoint.gguf import save_gguf

        out.parent.mkdir(parents=True, exist_ok=True)
        save_gguf(lm.model, lm.config, out, lm.tokenizer, quant)
        return [out.name]
    if dtype != "float32":
        lm.model.to(getattr(torch, dtype))
    with atomic_dir(out) as tmp:
        if to == "run":
            lm.save(tmp)
        else:
            from scratchlm.checkpoint.hf import save_hf

            save_hf(lm.model, lm.config, tmp, lm.tokenizer)
    return sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())


def _check_out(src: Path, out: Path, force: bool) -> None:
    """Refuse an OUT that is a file, that holds SRC, or that is not empty without --force."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file", "OUT must be a directory to create (or an empty one)")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UserError(f"{out} is not empty", "pass --force to replace it, or choose another OUT")
        if src.exists() and (src.resolve() == out.resolve() or out.resolve() in src.resolve().parents):
            raise UserError(f"{out} holds the model being converted ({src})",
                            "write the conversion to another directory")
