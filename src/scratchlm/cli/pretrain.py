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

Count-based presets (ngram-kn5, ngram-laplace3) fit an n-gram model on the same split in one
counting pass and report the same validation nats/char; they take --data, --tokenizer, --seed,
--prompt, --sample-tokens and --out, ignore --device and --threads, and reject the other options.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scratchlm.cli.options import set_threads
from scratchlm.errors import ConfigError, DataError

# The demo: tuned so that 'scratchlm pretrain' on 2 CPU cores beats nanoGPT's documented CPU run
# (benchmarks/demo_vs_nanogpt.py; the measurements are in docs/benchmarks.md).
DEFAULTS: dict[str, Any] = {
    "preset": "shakespeare-char",
    "data": "builtin:tinyshakespeare",
    "tokenizer": "char",
    "max_steps": None,
    "max_time": 300.0,
    "max_tokens": None,
    "epochs": None,
    "batch_size": 6,
    "grad_accum": 1,
    "context_length": None,  # None: the preset's
    # Every position starts a training window: nanoGPT's random offsets, drawn without replacement.
    "stride": 1,
    "qkv_bias": None,  # None: the preset's
    "tie_embeddings": None,  # None: the preset's
    "init": None,  # None: the preset's (GPT-2's N(0, 0.02))
    "lr": 3e-3,
    "min_lr": None,  # None: lr / 10
    "warmup_steps": 100,
    "weight_decay": 0.1,
    "beta2": 0.99,
    "grad_clip": 1.0,
    "dropout": 0.0,
    "eval_every": 250,
    "eval_batches": 16,
    "eval_at_start": False,
    "log_every": 10,
    "save_every": 0,
    "seed": 1337,
    "device": "cpu",
    "threads": 0,  # 0: PyTorch's default (one per core)
    "precision": "auto",
    "prompt": "\n",
    "sample_tokens": 150,
}
VAL_FRACTION = 0.1  # the last 10% of the text, as nanoGPT's shakespeare_char

# Options that may differ when resuming: they do not change the trajectory (or they extend it).
RESUME_FREE = {"max_steps", "max_time", "max_tokens", "epochs", "eval_every", "eval_batches", "eval_at_start",
               "log_every", "save_every", "device", "threads", "prompt", "sample_tokens", "out", "resume"}
BUDGETS = ("max_steps", "max_time", "max_tokens", "epochs")


def _eval_every(value: str) -> int | str:
    if value == "epoch":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of steps or 'epoch', got {value!r}") from None


def configure(parser: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    # SUPPRESS: an option is absent unless given, so that --resume can tell what the user changed.
    s = argparse.SUPPRESS

    def opt(group: Any, flag: str, help_: str, shown: Any = None, **kw: Any) -> None:
        key = flag.lstrip("-").replace("-", "_")
        default = d.get(key)
        if shown is None:
            shown = "off" if default in (None, 0) else default
            shown = repr(default) if isinstance(default, str) else shown
        group.add_argument(flag, default=s, help=f"{help_} (default: {shown})", **kw)

    g = parser.add_argument_group("model and data")
    opt(g, "--preset", "model preset; 'scratchlm presets' lists them", metavar="NAME")
    opt(g, "--data", "training text: a UTF-8 file or builtin:NAME", metavar="PATH")
    opt(g, "--tokenizer", "'char', 'bpe:N' (train N tokens), or a tokenizer path", metavar="SPEC")
    opt(g, "--context-length", "tokens per training window, at most the preset's positions",
        shown="the preset's", type=int, metavar="N")
    opt(g, "--stride", "tokens between the starts of consecutive training windows (the context "
        "length: disjoint windows, as Raschka ch. 5; validation windows are always disjoint)",
        type=int, metavar="N")
    opt(g, "--dropout", "dropout probability", type=float, metavar="P")
    g.add_argument("--qkv-bias", action=argparse.BooleanOptionalAction, default=s,
                   help="biases on the query/key/value projections (default: the preset's)")
    g.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=s,
                   help="share the token embedding and output matrices (default: the preset's)")
    g.add_argument("--init", choices=["gpt2", "pytorch"], default=s,
                   help="initial weights: 'gpt2' (N(0, 0.02), residual projections scaled down) or "
                        "'pytorch' (each layer's default, embeddings N(0, 1): Raschka's GPTModel) "
                        "(default: gpt2)")
    g = parser.add_argument_group("budget (training stops at the first one reached)")
    g.add_argument("--max-time", type=float, default=s, metavar="SECONDS",
                   help=f"wall-clock seconds, evaluation included; 0 = none (default: {d['max_time']:g}, "
                        "or none when another budget is given)")
    opt(g, "--max-steps", "optimizer steps", type=int, metavar="N")
    opt(g, "--max-tokens", "training tokens", type=int, metavar="N")
    opt(g, "--epochs", "passes over the training windows", type=float, metavar="N")
    g = parser.add_argument_group("optimization")
    opt(g, "--batch-size", "windows per step and process", type=int, metavar="N")
    opt(g, "--grad-accum", "micro-batches accumulated per step", type=int, metavar="N")
    opt(g, "--lr", "peak learning rate (AdamW)", type=float)
    opt(g, "--min-lr", "final learning rate of the cosine decay (= --lr, with --warmup-steps 0: a "
        "constant rate)", shown="lr/10", type=float)
    opt(g, "--warmup-steps", "linear warmup steps", type=int, metavar="N")
    opt(g, "--weight-decay", "AdamW weight decay on matrices", type=float)
    opt(g, "--beta2", "AdamW's second-moment decay (0.99 suits small models and batches)", type=float)
    opt(g, "--grad-clip", "maximum global gradient norm; 0 = no clipping", type=float, metavar="NORM")
    opt(g, "--seed", "random seed (initialisation, data order, dropout)", type=int)
    opt(g, "--precision", "fp32, bf16 (autocast, fp32 master weights), or auto: bf16 where it is fast "
        "(CUDA; CPUs with AMX or AVX512-BF16, timed on the model)", choices=["fp32", "bf16", "auto"])
    opt(g, "--device", "cpu, cuda, cuda:1, or auto", metavar="DEVICE")
    opt(g, "--threads", "CPU threads; on cores shared with other jobs, 1 can be much faster than 2",
        shown="one per core", type=int, metavar="N")
    g = parser.add_argument_group("evaluation and output")
    opt(g, "--eval-every", "steps between evaluations (each with a text sample), or 'epoch': at the end "
        "of every pass over the training windows", type=_eval_every, metavar="N|epoch")
    opt(g, "--eval-batches", "batches per split and evaluation; 0 = every window of both splits",
        type=int, metavar="N")
    g.add_argument("--eval-at-start", action="store_true", default=s,
                   help="also evaluate the untrained model, before the first update (default: off)")
    opt(g, "--log-every", "steps between training-loss lines in metrics.jsonl", type=int, metavar="N")
    opt(g, "--save-every", "steps between checkpoints (one is always written at the end and on Ctrl-C)",
        type=int, metavar="N")
    opt(g, "--prompt", "prompt of the text samples", metavar="TEXT")
    opt(g, "--sample-tokens", "tokens per sample", type=int, metavar="N")
    g.add_argument("--out", default=s, metavar="DIR",
                   help="run dir to create (default: runs/PRESET-TIMESTAMP)")
    g.add_argument("--resume", default=s, metavar="RUN_DIR",
                   help="continue this run exactly where its last checkpoint left it")
    parser.set_defaults(func=run)


# ---------------------------------------------------------------------------------------------
# Settings: the defaults, or (when resuming) the run's own, with the options given on top
# ---------------------------------------------------------------------------------------------


def _saved_settings(payload: dict[str, Any]) -> dict[str, Any]:
    """The CLI settings a run was started with, read back from its config.json."""
    training, data, model = payload.get("training") or {}, payload.get("data") or {}, payload["model"]
    settings = {
        "preset": data.get("preset", model.get("name")), "data": data.get("data"),
        "tokenizer": data.get("tokenizer"), "context_length": model.get("context_length"),
        "stride": data.get("stride"), "dropout": model.get("dropout"), "qkv_bias": model.get("qkv_bias"),
        "tie_embeddings": model.get("tie_embeddings"), "init": model.get("init") or "gpt2",
        "epochs": training.get("max_epochs"),
        "prompt": training.get("sample_prompt"),
    }
    for key in ("max_steps", "max_time", "max_tokens", "batch_size", "grad_accum", "lr", "min_lr",
                "warmup_steps", "weight_decay", "beta2", "grad_clip", "eval_every", "eval_batches",
                "eval_at_start", "log_every", "save_every", "seed", "precision", "device", "sample_tokens"):
        settings[key] = training.get(key)
    if "grad_clip" in training and training["grad_clip"] is None:
        settings["grad_clip"] = 0.0  # saved as None: no clipping, which the option spells 0
    return settings


def _resume_settings(given: dict[str, Any]) -> tuple[dict[str, Any], Path, dict[str, Any]]:
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
                          f"drop {flag} to continue the run as it was, "
                          "or start a new run with another --out")
    settings = {**DEFAULTS, **{k: v for k, v in saved.items() if v is not None}}
    if any(k in given for k in BUDGETS):  # a new budget replaces the old one
        settings.update(dict.fromkeys(BUDGETS))
    settings.update(given)
    return settings, run_dir, payload


def new_settings(given: dict[str, Any], resumable: bool = True) -> tuple[dict[str, Any], Path]:
    """The options of a new run over the defaults, and its run dir (which must be new or empty)."""
    settings = {**DEFAULTS, **given}
    if any(k in given for k in ("max_steps", "max_tokens", "epochs")) and "max_time" not in given:
        settings["max_time"] = None  # another budget was asked for: no cap at the demo's 5 minutes
    if settings["max_time"] == 0:
        settings["max_time"] = None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(given["out"]) if "out" in given else Path("runs") / f"{settings['preset']}-{stamp}"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists",
                          f"continue that run with --resume {out}, or choose another --out" if resumable
                          else "choose another --out (an n-gram run is refitted in seconds, not resumed)")
    return settings, out


# ---------------------------------------------------------------------------------------------
# Building the pieces: every check happens here, before anything is written
# ---------------------------------------------------------------------------------------------


def make_tokenizer(spec: str, train_text: str, text: str) -> Any:
    """The tokenizer ``--tokenizer`` names: char, bpe:N trained on the training split, or a path."""
    from scratchlm.tokenizers import CharTokenizer
    from scratchlm.tokenizers import load as load_tokenizer

    if spec == "char":
        # The characters of the whole text (as nanoGPT does), so that the validation split encodes.
        return CharTokenizer.from_text(text)
    if spec.startswith("bpe:"):
        size = spec[4:]
        if not size.isdigit():
            raise ConfigError(f"--tokenizer {spec}: expected bpe:N with N a number of tokens",
                              "e.g. --tokenizer bpe:1024")
        from scratchlm.tokenizers.train_bpe import train_bpe

        return train_bpe(train_text, int(size), progress=False)
    return load_tokenizer(spec)


@dataclass
class Splits:
    """The corpus as pretraining sees it: the first 90% for training, the last 10% for validation."""

    tokenizer: Any
    train_ids: list[int]
    val_ids: list[int]
    val_chars: int  # validation loss per character is comparable across tokenizers

    def info(self, settings: dict[str, Any]) -> dict[str, Any]:
        """The run's ``data`` record in config.json."""
        return {"data": settings["data"], "tokenizer": settings["tokenizer"], "preset": settings["preset"],
                "val_fraction": VAL_FRACTION, "train_tokens": len(self.train_ids),
                "val_tokens": len(self.val_ids), "val_chars": self.val_chars}


def encode_splits(settings: dict[str, Any], tokenizer_dir: Path | None = None) -> Splits:
    """Read ``--data``, split it and encode both parts with ``--tokenizer`` (or a run's saved one)."""
    from scratchlm.data.corpora import read_corpus
    from scratchlm.tokenizers import load as load_tokenizer

    text = read_corpus(settings["data"])
    split = int(len(text) * (1 - VAL_FRACTION))
    train_text, val_text = text[:split], text[split:]
    if tokenizer_dir is not None:
        tokenizer = load_tokenizer(tokenizer_dir)
    else:
        tokenizer = make_tokenizer(settings["tokenizer"], train_text, text)
    train_ids = tokenizer.encode(train_text, allowed_special="all")
    val_ids = tokenizer.encode(val_text, allowed_special="all") if val_text else []
    return Splits(tokenizer, train_ids, val_ids, len(val_text))


def _model_config(settings: dict[str, Any], tokenizer: Any, payload: dict[str, Any] | None) -> Any:
    """The preset sized to the tokenizer's vocabulary and the training context (or the run's own)."""
    from scratchlm.checkpoint.io import run_model_config
    from scratchlm.models import from_preset

    if payload is not None:
        return run_model_config(payload)
    base = from_preset(settings["preset"])
    ctx = settings["context_length"] or base.context_length
    if ctx < 1:
        raise ConfigError(f"--context-length must be positive, got {ctx}", "e.g. --context-length 256")
    if ctx > base.context_length:
        raise ConfigError(f"context length {ctx} is longer than the {base.context_length} positions of "
                          f"preset {settings['preset']}",
                          f"pass --context-length {base.context_length} or less")
    flags = {k: settings[k] for k in ("qkv_bias", "tie_embeddings", "init") if settings[k] is not None}
    return base.replace(vocab_size=tokenizer.vocab_size, context_length=ctx, dropout=settings["dropout"],
                        **flags)


def _check_ids(config: Any, train_ids: list[int], val_ids: list[int], data: str) -> None:
    top = max(max(train_ids, default=0), max(val_ids, default=0))
    if top >= config.vocab_size:
        raise ConfigError(f"the tokenizer produces id {top}, outside the model's vocabulary of "
                          f"{config.vocab_size}", "use the tokenizer the run was trained with, or a model "
                          "sized to this tokenizer")
    ctx = config.context_length
    for name, ids, part in (("training", train_ids, "first 90%"), ("validation", val_ids, "last 10%")):
        if len(ids) < ctx + 1:
            raise DataError(f"the {name} split ({part} of {data}) has {len(ids)} tokens, fewer than one "
                            f"context window of {ctx} + 1", "use a longer text or a smaller --context-length")


def _train_config(settings: dict[str, Any]) -> Any:
    from scratchlm.training.trainer import TrainConfig

    return TrainConfig(
        batch_size=settings["batch_size"], grad_accum=settings["grad_accum"], lr=settings["lr"],
        min_lr=settings["min_lr"], warmup_steps=settings["warmup_steps"],
        weight_decay=settings["weight_decay"], beta2=settings["beta2"],
        grad_clip=settings["grad_clip"] or None, max_steps=settings["max_steps"],
        max_epochs=settings["epochs"], max_tokens=settings["max_tokens"], max_time=settings["max_time"],
        eval_every=settings["eval_every"], eval_batches=settings["eval_batches"],
        eval_at_start=bool(settings["eval_at_start"]), log_every=settings["log_every"],
        save_every=settings["save_every"], sample_prompt=settings["prompt"],
        sample_tokens=settings["sample_tokens"], seed=settings["seed"], precision=settings["precision"],
        device=settings["device"],
    )


def run(args: argparse.Namespace) -> int:
    given = {k: v for k, v in vars(args).items() if k != "func"}
    from scratchlm.cli import pretrain_ngram

    if pretrain_ngram.wanted(given):  # a count-based preset: one counting pass, no training loop
        return pretrain_ngram.run(given)
    payload = None
    if "resume" in given:
        settings, run_dir, payload = _resume_settings(given)
    else:
        settings, run_dir = new_settings(given)
    tc = _train_config(settings)  # validates the numbers before any slow work
    if settings["stride"] < 1:
        raise ConfigError(f"--stride must be positive, got {settings['stride']}",
                          "pass 1 for every offset, or the context length for disjoint windows")
    set_threads(settings["threads"])

    import torch

    from scratchlm.data.windows import SlidingWindowDataset
    from scratchlm.models import build_model
    from scratchlm.training import distributed
    from scratchlm.training.trainer import Trainer

    splits = encode_splits(settings, run_dir / "tokenizer" if payload is not None else None)
    tokenizer, train_ids, val_ids = splits.tokenizer, splits.train_ids, splits.val_ids
    config = _model_config(settings, tokenizer, payload)
    _check_ids(config, train_ids, val_ids, settings["data"])
    if settings["prompt"]:
        tokenizer.encode(settings["prompt"])  # a prompt the tokenizer cannot encode fails now, not mid-run
    ctx = config.context_length
    data_info = {**splits.info(settings), "stride": settings["stride"]}
    train = SlidingWindowDataset(train_ids, ctx, settings["stride"])
    val = SlidingWindowDataset(val_ids, ctx, ctx)  # disjoint windows spread over the whole split

    dist = distributed.from_env(settings["device"])
    torch.manual_seed(settings["seed"])
    model = build_model(config)
    trainer = Trainer(model, tc, train, val_data=val, run_dir=run_dir, model_config=config,
                      tokenizer=tokenizer, data_info=data_info,
                      val_tokens_per_char=len(val_ids) / splits.val_chars, dist=dist)
    if payload is not None:
        info = trainer.check_resumable().info
        epochs = info["epoch"] + info["position"] / len(train)
        if tc.budget().progress(info["step"], epochs, info["tokens"], info["elapsed"]) >= 1.0:
            raise ConfigError(f"{run_dir} already reached its budget (step {info['step']})",
                              "pass a larger --max-steps or --max-time to train it further")
    distributed.barrier(dist)  # every rank has checked everything before rank 0 writes
    if dist.is_main:
        _announce(settings, config, model, trainer, run_dir, len(train_ids), len(val_ids),
                  tokenizer.vocab_size)
    try:
        result = trainer.fit(resume=payload is not None)
    except KeyboardInterrupt:
        if dist.is_main:
            print(f"interrupted at step {trainer.step}: checkpoint in {run_dir}; "
                  f"continue with: scratchlm pretrain --resume {run_dir}", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown(dist)
    if dist.is_main:
        report(f"{result.step:,} steps, {result.tokens:,} tokens in {result.elapsed:.0f} s", result, settings,
               run_dir, {"loss plot": run_dir / "loss.png", "checkpoint": run_dir / "model.safetensors"})
    return 0


def _announce(settings: dict[str, Any], config: Any, model: Any, trainer: Any, run_dir: Path,
              n_train: int, n_val: int, vocab: int) -> None:
    tc = trainer.config
    n_params = sum(p.numel() for p in model.parameters())
    verb = "resuming" if "resume" in settings else "training"
    print(f"{verb} {config.name}: {n_params / 1e6:.2f}M parameters, "
          f"{config.n_layer} layers × {config.n_embd}, "
          f"context {config.context_length}; {settings['data']}: {n_train:,} train / {n_val:,} validation "
          f"tokens, tokenizer {settings['tokenizer']} ({vocab} ids)", file=sys.stderr)
    print(f"batch {tc.batch_size}×{tc.grad_accum}×{trainer.dist.world_size} windows, lr {tc.lr:g}, "
          f"{trainer.precision} on {trainer.device}, budget {tc.budget().describe()}, run dir {run_dir}",
          file=sys.stderr)


def report(done: str, result: Any, settings: dict[str, Any], run_dir: Path, files: dict[str, Path]) -> None:
    """What a finished run prints: the figures, the last sample, where its files are, what next."""
    ev = result.last_eval or {}
    print(f"\ndone: {done}")
    if ev.get("val_loss") is not None:
        print(f"validation loss {ev['val_loss']:.4f} (perplexity {ev['val_perplexity']:.2f}"
              + (f", {nats:.4f} nats/char)" if (nats := ev.get("val_nats_per_char")) is not None else ")"))
    if result.sample:
        print(f"\n--- sample (prompt {settings['prompt']!r}) ---")
        print(settings["prompt"] + result.sample)
        print("---")
    prompt = "ROMEO:" if settings["data"] == "builtin:tinyshakespeare" else "TEXT"
    for label, path in {"run dir": run_dir, **files, "samples": run_dir / "samples.txt",
                        "metrics": run_dir / "metrics.jsonl"}.items():
        print(f"{label + ':':<12}{path}")
    print(f"continue:   scratchlm generate --model {run_dir} --prompt \"{prompt}\"")
