"""Pretrain a language model on a text file.  With no options this is the 5-minute demo:
a character-level model on builtin:tinyshakespeare (first 90% train, last 10% validation), on the
CPU, for 300 seconds, then a sample and the paths of the run dir, loss plot and checkpoint.

Tokenizers (--tokenizer): 'char' (one id per character of the text, as nanoGPT's shakespeare_char),
'bpe:N' (train a byte-level BPE of N tokens on the training split), or a path that
scratchlm.tokenizers.load opens (a directory with GPT-2's encoder.json + vocab.bpe, a tokenizer.json,
a saved scratchlm tokenizer, a .gguf file).  Validation loss is also reported in nats per character,
so runs with different tokenizers compare.

Data-parallel: torchrun --nproc_per_node=N -m scratchlm pretrain ... (--batch-size is per process).
Ctrl-C saves a checkpoint; --resume RUN_DIR continues it exactly.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from scratchlm.errors import ConfigError, DataError

# The demo: tuned so that 'scratchlm pretrain' on 2 CPU cores beats nanoGPT's documented CPU run
# (see benchmarks/demo_vs_nanogpt.py and docs/benchmarks.md).
DEFAULTS: dict[str, Any] = {
    "preset": "shakespeare-char",
    "data": "builtin:tinyshakespeare",
    "tokenizer": "char",
    "max_steps": None,
    "max_time": 300.0,
    "max_tokens": None,
    "epochs": None,
    "batch_size": 32,
    "grad_accum": 1,
    "context_length": None,  # None: the preset's
    "lr": 3e-3,
    "min_lr": None,  # None: lr / 10
    "warmup_steps": 50,
    "weight_decay": 0.1,
    "dropout": 0.0,
    "eval_every": 100,
    "eval_batches": 8,
    "save_every": 0,
    "seed": 1337,
    "device": "cpu",
    "precision": "auto",
    "prompt": "\n",
    "sample_tokens": 300,
}
VAL_FRACTION = 0.1  # the last 10% of the text, as nanoGPT's shakespeare_char
STRIDE = 1  # every position starts a training window (nanoGPT draws random offsets; this is that without replacement)

# Options that may differ when resuming: they do not change the trajectory (or they extend it).
RESUME_FREE = {"max_steps", "max_time", "max_tokens", "epochs", "eval_every", "eval_batches", "save_every",
               "device", "prompt", "sample_tokens", "out", "resume"}


def configure(parser: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    s = argparse.SUPPRESS  # absent unless given, so --resume can tell what the user asked to change

    def opt(flag: str, help_: str, **kw: Any) -> None:
        key = flag.lstrip("-").replace("-", "_")
        default = d.get(key)
        shown = "the preset's" if key == "context_length" else ("off" if default in (None, 0) else default)
        if key == "prompt":
            shown = repr(default)
        parser.add_argument(flag, default=s, help=f"{help_} (default: {shown})", **kw)

    g = parser.add_argument_group("model and data")
    opt("--preset", "model preset; 'scratchlm presets' lists them", metavar="NAME")
    opt("--data", "training text: a UTF-8 file or builtin:NAME", metavar="PATH")
    opt("--tokenizer", "'char', 'bpe:N' (train N tokens), or a tokenizer path", metavar="SPEC")
    opt("--context-length", "tokens per training window (at most the preset's positions)", type=int, metavar="N")
    opt("--dropout", "dropout probability", type=float, metavar="P")
    g = parser.add_argument_group("budget (training stops at the first one reached)")
    g.add_argument("--max-time", type=float, default=s, metavar="SECONDS",
                   help=f"wall-clock budget in seconds, evaluation included; 0 = none "
                        f"(default: {d['max_time']:g}, unless another budget is given)")
    g.add_argument("--max-steps", type=int, default=s, metavar="N", help="optimizer steps (default: off)")
    g.add_argument("--max-tokens", type=int, default=s, metavar="N", help="training tokens (default: off)")
    g.add_argument("--epochs", type=float, default=s, metavar="N", help="passes over the training windows "
                   "(default: off)")
    g = parser.add_argument_group("optimization")
    opt("--batch-size", "windows per step and process", type=int, metavar="N")
    opt("--grad-accum", "micro-batches accumulated per step", type=int, metavar="N")
    opt("--lr", "peak learning rate (AdamW)", type=float)
    opt("--min-lr", "final learning rate of the cosine decay; off = lr/10", type=float)
    opt("--warmup-steps", "linear warmup steps", type=int, metavar="N")
    opt("--weight-decay", "AdamW weight decay on matrices", type=float)
    opt("--seed", "random seed (initialisation, data order, dropout)", type=int)
    opt("--precision", "fp32, bf16 (autocast, fp32 master weights), or auto: bf16 where it is fast "
        "(CUDA; CPUs with AMX)", choices=["fp32", "bf16", "auto"])
    opt("--device", "cpu, cuda, cuda:1, or auto", metavar="DEVICE")
    g = parser.add_argument_group("evaluation and output")
    opt("--eval-every", "steps between evaluations (with a text sample)", type=int, metavar="N")
    opt("--eval-batches", "batches per split and evaluation", type=int, metavar="N")
    opt("--save-every", "steps between checkpoints (one is always written at the end and on Ctrl-C)",
        type=int, metavar="N")
    opt("--prompt", "prompt of the text samples", metavar="TEXT")
    opt("--sample-tokens", "tokens per sample", type=int, metavar="N")
    parser.add_argument("--out", default=s, metavar="DIR", help="run dir to create (default: runs/PRESET-TIMESTAMP)")
    parser.add_argument("--resume", default=s, metavar="RUN_DIR",
                        help="continue this run exactly where its last checkpoint left it")
    parser.set_defaults(func=run)


# ---------------------------------------------------------------------------------------------
# Settings: defaults, or (when resuming) the run's own, with the options given on top
# ---------------------------------------------------------------------------------------------


def _given(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k != "func"}


def _saved_settings(payload: dict[str, Any]) -> dict[str, Any]:
    """The CLI settings a run was started with, read back from its config.json."""
    training, data, model = payload.get("training") or {}, payload.get("data") or {}, payload["model"]
    settings = {
        "preset": data.get("preset", model.get("name")), "data": data.get("data"),
        "tokenizer": data.get("tokenizer"), "context_length": model.get("context_length"),
        "dropout": model.get("dropout"), "epochs": training.get("max_epochs"), "prompt": training.get("sample_prompt"),
    }
    for key in ("max_steps", "max_time", "max_tokens", "batch_size", "grad_accum", "lr", "min_lr", "warmup_steps",
                "weight_decay", "eval_every", "eval_batches", "save_every", "seed", "precision", "device",
                "sample_tokens"):
        settings[key] = training.get(key)
    return settings


def _settings(args: argparse.Namespace) -> tuple[dict[str, Any], Path, bool, dict[str, Any] | None]:
    """(settings, run dir, resuming?, the run's config.json when resuming)."""
    given = _given(args)
    if "resume" in given:
        from scratchlm.checkpoint.io import read_run_config

        run_dir = Path(given["resume"])
        if "out" in given and Path(given["out"]).resolve() != run_dir.resolve():
            raise ConfigError("--out and --resume name different run dirs", "pass only --resume RUN_DIR")
        payload = read_run_config(run_dir)
        saved = _saved_settings(payload)
        for key, value in given.items():
            if key in RESUME_FREE or saved.get(key) is None or value == saved[key]:
                continue
            flag = "--" + key.replace("_", "-")
            raise ConfigError(f"cannot resume {run_dir}: {flag} {value} differs from the run's {saved[key]}",
                              f"drop {flag} to continue the run as it was, or start a new run with another --out")
        settings = {**DEFAULTS, **{k: v for k, v in saved.items() if v is not None}}
        budget_keys = ("max_steps", "max_time", "max_tokens", "epochs")
        if any(k in given for k in budget_keys):  # a new budget replaces the old one
            for key in budget_keys:
                settings[key] = None
        settings.update(given)
        return settings, run_dir, True, payload
    settings = {**DEFAULTS, **given}
    if any(k in given for k in ("max_steps", "max_tokens", "epochs")) and "max_time" not in given:
        settings["max_time"] = None  # another budget was asked for: do not cap it at the demo's 5 minutes
    if settings.get("max_time") == 0:
        settings["max_time"] = None
    out = Path(given["out"]) if "out" in given else Path("runs") / f"{settings['preset']}-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists", f"continue that run with --resume {out}, or choose another --out")
    return settings, out, False, None


# ---------------------------------------------------------------------------------------------
# Building the pieces (every check happens here, before anything is written)
# ---------------------------------------------------------------------------------------------


def _tokenizer(spec: str, train_text: str, text: str) -> Any:
    from scratchlm.tokenizers import CharTokenizer
    from scratchlm.tokenizers import load as load_tokenizer

    if spec == "char":
        return CharTokenizer.from_text(text)  # the whole text's characters, as nanoGPT: validation must encode
    if spec.startswith("bpe:"):
        size = spec[4:]
        if not size.isdigit():
            raise ConfigError(f"--tokenizer {spec}: expected bpe:N with N a number of tokens", "e.g. --tokenizer bpe:1024")
        from scratchlm.tokenizers.train_bpe import train_bpe

        return train_bpe(train_text, int(size), progress=False)
    return load_tokenizer(spec)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, allowed_special="all") if text else []


def run(args: argparse.Namespace) -> int:
    settings, run_dir, resuming, payload = _settings(args)

    import torch

    from scratchlm.checkpoint.io import run_model_config
    from scratchlm.data.corpora import read_corpus
    from scratchlm.data.windows import SlidingWindowDataset
    from scratchlm.models import build_model, from_preset
    from scratchlm.training import distributed
    from scratchlm.training.trainer import TrainConfig, Trainer

    text = read_corpus(settings["data"])
    split = int(len(text) * (1 - VAL_FRACTION))
    train_text, val_text = text[:split], text[split:]
    if resuming:
        from scratchlm.tokenizers import load as load_tokenizer

        tokenizer = load_tokenizer(run_dir / "tokenizer")
    else:
        tokenizer = _tokenizer(settings["tokenizer"], train_text, text)
    train_ids, val_ids = _encode(tokenizer, train_text), _encode(tokenizer, val_text)

    # The model: the preset, sized to the tokenizer's vocabulary and the training context.
    if resuming:
        config = run_model_config(payload)
    else:
        base = from_preset(settings["preset"])
        ctx = settings["context_length"] or base.context_length
        if ctx < 1:
            raise ConfigError(f"--context-length must be positive, got {ctx}", "e.g. --context-length 256")
        if ctx > base.context_length:
            raise ConfigError(f"context length {ctx} is longer than the {base.context_length} positions of "
                              f"preset {settings['preset']}", f"pass --context-length {base.context_length} or less")
        config = base.replace(vocab_size=tokenizer.vocab_size, context_length=ctx, dropout=settings["dropout"])
    ctx = config.context_length
    top = max(max(train_ids, default=0), max(val_ids, default=0))
    if top >= config.vocab_size:
        raise ConfigError(f"the tokenizer produces id {top}, outside the model's vocabulary of {config.vocab_size}",
                          "use the tokenizer the run was trained with, or a model sized to this tokenizer")
    for name, ids, part in (("training", train_ids, "first 90%"), ("validation", val_ids, "last 10%")):
        if len(ids) < ctx + 1:
            raise DataError(f"the {name} split ({part} of {settings['data']}) has {len(ids)} tokens, fewer than one "
                            f"context window of {ctx} + 1", "use a longer text or a smaller --context-length")
    data_info = {"data": settings["data"], "tokenizer": settings["tokenizer"], "preset": settings["preset"],
                 "val_fraction": VAL_FRACTION, "stride": STRIDE, "train_tokens": len(train_ids),
                 "val_tokens": len(val_ids), "val_chars": len(val_text)}
    train = SlidingWindowDataset(train_ids, ctx, STRIDE)
    val = SlidingWindowDataset(val_ids, ctx, ctx)  # disjoint windows: validation covers the split evenly
    tc = TrainConfig(
        batch_size=settings["batch_size"], grad_accum=settings["grad_accum"], lr=settings["lr"],
        min_lr=settings["min_lr"], warmup_steps=settings["warmup_steps"], weight_decay=settings["weight_decay"],
        max_steps=settings["max_steps"], max_epochs=settings["epochs"], max_tokens=settings["max_tokens"],
        max_time=settings["max_time"], eval_every=settings["eval_every"], eval_batches=settings["eval_batches"],
        save_every=settings["save_every"], sample_prompt=settings["prompt"], sample_tokens=settings["sample_tokens"],
        seed=settings["seed"], precision=settings["precision"], device=settings["device"],
    )
    if settings["prompt"]:
        try:
            tokenizer.encode(settings["prompt"])
        except Exception as err:
            raise ConfigError(f"the sample prompt cannot be encoded: {err}", "pass another --prompt") from None

    ctx_dist = distributed.from_env(settings["device"])
    torch.manual_seed(settings["seed"])
    model = build_model(config)
    trainer = Trainer(model, tc, train, val_data=val, run_dir=run_dir, model_config=config, tokenizer=tokenizer,
                      data_info=data_info, val_tokens_per_char=len(val_ids) / len(val_text), dist=ctx_dist)
    if resuming:
        state = trainer.check_resumable()
        info = state.info
        epochs = info["epoch"] + info["position"] / len(train)
        if tc.budget().progress(info["step"], epochs, info["tokens"], info["elapsed"]) >= 1.0:
            raise ConfigError(f"{run_dir} already reached its budget (step {state.info['step']})",
                              "pass a larger --max-steps or --max-time to train it further")
    distributed.barrier(ctx_dist)  # every rank has checked everything before rank 0 writes
    main = ctx_dist.is_main
    if main:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{'resuming' if resuming else 'training'} {config.name} ({n_params / 1e6:.2f}M parameters, "
              f"{config.n_layer} layers × {config.n_embd} wide, context {ctx}) on {settings['data']}: "
              f"{len(train_ids):,} train / {len(val_ids):,} validation tokens, tokenizer {settings['tokenizer']} "
              f"({tokenizer.vocab_size} ids)", file=sys.stderr)
        print(f"batch {tc.batch_size}×{tc.grad_accum}×{ctx_dist.world_size} windows, lr {tc.lr:g}, "
              f"{trainer.precision} on {trainer.device}, budget {tc.budget().describe()}, run dir {run_dir}",
              file=sys.stderr)
    try:
        result = trainer.fit(resume=resuming)
    except KeyboardInterrupt:
        if main:
            print(f"interrupted at step {trainer.step}: checkpoint in {run_dir}; "
                  f"continue with: scratchlm pretrain --resume {run_dir}", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown(ctx_dist)
    if not main:
        return 0
    _report(result, settings, run_dir)
    return 0


def _report(result: Any, settings: dict[str, Any], run_dir: Path) -> None:
    ev = result.last_eval or {}
    print(f"\ndone: {result.step:,} steps, {result.tokens:,} tokens in {result.elapsed:.0f} s")
    if ev.get("val_loss") is not None:
        nats = ev.get("val_nats_per_char")
        print(f"validation loss {ev['val_loss']:.4f} (perplexity {ev['val_perplexity']:.2f}"
              + (f", {nats:.4f} nats/char)" if nats is not None else ")"))
    if result.sample:
        print(f"\n--- sample (prompt {settings['prompt']!r}) ---")
        print(settings["prompt"] + result.sample)
        print("---")
    prompt = "ROMEO:" if settings["data"] == "builtin:tinyshakespeare" else "TEXT"
    print(f"run dir:    {run_dir}\nloss plot:  {run_dir / 'loss.png'}\ncheckpoint: {run_dir / 'model.safetensors'}"
          f"\nsamples:    {run_dir / 'samples.txt'}\nmetrics:    {run_dir / 'metrics.jsonl'}\n"
          f"continue:   scratchlm generate --model {run_dir} --prompt \"{prompt}\"")
