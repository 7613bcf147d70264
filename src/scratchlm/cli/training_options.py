"""The training options every training command shares (pretrain, finetune ...): one path to a TrainConfig.

Each command states its recipe as a ``TrainConfig`` of defaults (pretraining's demo, the books'
finetuning recipes); ``add_training_options`` turns its fields into options with the same names
and help everywhere, showing that recipe's defaults, and ``train_config`` reads them back over
the recipe — or, with ``--resume``, over the run's own saved config, refusing options that would
change its trajectory.  Options are absent unless given (``argparse.SUPPRESS``), so a resume can
tell what the user changed.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from typing import Any

from scratchlm.errors import ConfigError
from scratchlm.runtime import PRECISIONS
from scratchlm.training.config import SCHEDULES, TrainConfig

# option name (as argparse stores it) -> TrainConfig field, where they differ
FIELD = {"epochs": "max_epochs"}
BUDGETS = ("max_steps", "max_time", "max_tokens", "epochs")
# Options that are not TrainConfig fields but belong to every training command.
COMMON = ("threads", "resume", "out")


def _eval_every(value: str) -> int | str:
    if value == "epoch":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of steps or 'epoch', got {value!r}") from None


def _shown(value: Any) -> str:
    return "off" if value in (None, 0) else repr(value) if isinstance(value, str) else f"{value:g}" \
        if isinstance(value, float) else str(value)


def add_training_options(parser: argparse.ArgumentParser, defaults: TrainConfig, *, items: str = "examples",
                         sources: Mapping[str, str] | None = None) -> None:
    """Budget, optimizer, evaluation and run-dir options over ``defaults``.

    ``items``: what a batch holds (windows, examples, pairs), for the help texts.  ``sources``:
    where a default comes from, by field (``{"lr": "Raschka ch. 6"}``), shown in ``--help``.
    """
    s = argparse.SUPPRESS
    sources = sources or {}

    def opt(group: argparse._ArgumentGroup, flag: str, help_: str, **kw: Any) -> None:
        key = flag.lstrip("-").replace("-", "_")
        name = FIELD.get(key, key)
        shown = kw.pop("shown", None) or _shown(getattr(defaults, name))
        source = f"; {sources[name]}" if name in sources else ""
        group.add_argument(flag, default=s, help=f"{help_} (default: {shown}{source})", **kw)

    g = parser.add_argument_group("budget (training stops at the first one reached; a budget given "
                                  "replaces the default ones)")
    opt(g, "--max-time", "wall-clock seconds, evaluation included; 0 = none", type=float, metavar="SECONDS")
    opt(g, "--max-steps", "optimizer steps", type=int, metavar="N")
    opt(g, "--max-tokens", "items the loss counts (tokens; examples or pairs when finetuning)", type=int,
        metavar="N")
    opt(g, "--epochs", f"passes over the training {items}", type=float, metavar="N")
    g = parser.add_argument_group("optimization")
    opt(g, "--batch-size", f"{items} per step and process", type=int, metavar="N")
    opt(g, "--grad-accum", "micro-batches accumulated per step", type=int, metavar="N")
    opt(g, "--lr", "peak learning rate (AdamW)", type=float)
    opt(g, "--lr-schedule", "cosine: warmup, then a half-cosine decay to --min-lr over the budget; linear: "
        "a straight-line decay instead; constant: --lr after the warmup", choices=list(SCHEDULES))
    opt(g, "--min-lr", "final learning rate of the decay", shown="lr/10" if defaults.min_lr is None
        else None, type=float)
    opt(g, "--warmup-steps", "linear warmup steps", type=int, metavar="N")
    opt(g, "--weight-decay", "AdamW weight decay on matrices", type=float)
    opt(g, "--beta2", "AdamW's second-moment decay (0.99 suits small models and batches)", type=float)
    opt(g, "--grad-clip", "maximum global gradient norm; 0 = no clipping", type=float, metavar="NORM")
    opt(g, "--seed", "random seed (initialisation, data order, dropout)", type=int)
    opt(g, "--precision", "fp32, bf16 (autocast, fp32 master weights), or auto: bf16 where it is fast "
        "(CUDA; CPUs with AMX or AVX512-BF16, timed on the model)", choices=list(PRECISIONS))
    opt(g, "--device", "cpu, cuda, cuda:1, or auto", metavar="DEVICE")
    g.add_argument("--threads", type=int, default=s, metavar="N",
                   help="CPU threads; on cores shared with other jobs, 1 can be much faster than 2 "
                        "(default: one per core)")
    g = parser.add_argument_group("evaluation and checkpoints")
    opt(g, "--eval-every", f"steps between evaluations, or 'epoch': at the end of every pass over the "
        f"training {items}", type=_eval_every, metavar="N|epoch")
    opt(g, "--eval-batches", "batches per split and evaluation; 0 = every example of both splits",
        type=int, metavar="N")
    g.add_argument("--eval-at-start", action="store_true", default=s,
                   help="also evaluate the untrained model, before the first update "
                        f"(default: {'on' if defaults.eval_at_start else 'off'})")
    opt(g, "--log-every", "steps between training-loss lines in metrics.jsonl", type=int, metavar="N")
    opt(g, "--save-every", "steps between checkpoints (one is always written at the end and on Ctrl-C)",
        type=int, metavar="N")
    g.add_argument("--resume", default=s, metavar="RUN_DIR",
                   help="continue this run exactly where its last checkpoint left it")


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options the user gave (every other one is absent: ``argparse.SUPPRESS``)."""
    return {k: v for k, v in vars(args).items() if k != "func"}


def train_config(given: Mapping[str, Any], defaults: TrainConfig,
                 saved: Mapping[str, Any] | None = None) -> TrainConfig:
    """The ``TrainConfig`` of the options ``given`` over ``defaults``, or over a resumed run's ``saved``
    training config (``config.json``'s ``"training"``).

    Resuming: an option that shapes the trajectory (``TrainConfig.TRAJECTORY``) may not differ
    from the run's; budgets, evaluation, checkpoints and the device may.  A budget given replaces
    every budget of the base it is laid over.
    """
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    base = defaults.to_dict()
    if saved is not None:
        base.update({k: v for k, v in saved.items() if k in fields})
    changes = {FIELD.get(k, k): v for k, v in given.items() if FIELD.get(k, k) in fields}
    if "grad_clip" in changes and not changes["grad_clip"]:
        changes["grad_clip"] = None  # the option spells "no clipping" 0
    if "max_time" in changes and not changes["max_time"]:
        changes["max_time"] = None
    if saved is not None:
        for key in TrainConfig.TRAJECTORY:
            if key in changes and key in saved and changes[key] != saved[key]:
                flag = "--" + key.replace("_", "-")
                raise ConfigError(f"cannot resume: {flag} {changes[key]} differs from the run's {saved[key]}",
                                  f"drop {flag} to continue the run as it was, or start a new run "
                                  "with another --out")
    if any(FIELD.get(k, k) in changes for k in BUDGETS):
        base.update(dict.fromkeys(FIELD.get(k, k) for k in BUDGETS))
    if saved is not None and base.get("precision") not in PRECISIONS:
        base["precision"] = defaults.precision
    return TrainConfig(**{**base, **changes})
