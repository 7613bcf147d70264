"""How to train (``TrainConfig``) and what a finished run returns (``TrainResult``).

One dataclass for every objective: pretraining and each finetuning recipe differ in their
defaults (``scratchlm.cli.training_options`` builds a config from command-line options over a
recipe's defaults), not in the fields they have.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scratchlm.errors import ConfigError
from scratchlm.runtime import PRECISIONS
from scratchlm.training.schedule import Budget, WarmupDecay

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class TrainConfig:
    """How to train; saved in the run dir's ``config.json`` under ``"training"``.

    ``batch_size`` is per process and per micro-batch: a step sees
    ``batch_size × grad_accum × world_size`` examples.
    """

    batch_size: int = 32
    grad_accum: int = 1
    optimizer: str = "adamw"  # "adamw", or "sgd": plain SGD (Burkov's classifiers), decay as L2
    lr: float = 1e-3
    lr_schedule: str = "cosine"  # "cosine" / "linear": decay to min_lr over the budget; "constant": lr
    min_lr: float | None = None  # None: lr / 10 (cosine)
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # max global gradient norm; None: no clipping
    # Budgets: training stops at the first one reached (at least one must be set).
    max_steps: int | None = None
    max_epochs: float | None = None
    max_tokens: int | None = None  # items the loss counted: tokens for LMs, examples, pairs
    max_time: float | None = None  # seconds, evaluation and checkpoints included
    eval_every: int | str | None = 250  # steps, or "epoch"; None or 0: evaluate only at the end
    eval_batches: int = 8  # global batches of each split per evaluation (fixed examples); 0: all
    eval_at_start: bool = False  # also evaluate the untrained model (step 0) of a new run
    save_every: int | None = None  # steps; None or 0: save only at the end (and on Ctrl-C)
    log_every: int = 10  # steps between "train" lines in metrics.jsonl
    seed: int = 1337
    precision: str = "auto"  # "fp32", "bf16" (autocast, fp32 master weights) or "auto"
    device: str = "auto"
    progress: bool = True  # the tqdm bar and status lines on stderr

    # Fields that shape the trajectory: a resumed run must have the same values.  The budgets,
    # evaluation, saving and display settings may change (a longer budget extends a run).
    TRAJECTORY = ("batch_size", "grad_accum", "optimizer", "lr", "lr_schedule", "min_lr", "warmup_steps",
                  "weight_decay", "beta1", "beta2", "eps", "grad_clip", "seed", "precision")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for key in ("batch_size", "grad_accum", "log_every"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key} must be a positive integer, got {value!r}",
                                  f"pass a positive {key}")
        if not isinstance(self.eval_batches, int) or self.eval_batches < 0:
            raise ConfigError(f"eval_batches must be a non-negative integer, got {self.eval_batches!r}",
                              "pass 0 to evaluate on every example")
        for key in ("eval_every", "save_every"):
            value = getattr(self, key)
            if key == "eval_every" and value == "epoch":
                continue
            if value is not None and (not isinstance(value, int) or value < 0):
                what = " or 'epoch'" if key == "eval_every" else ""
                raise ConfigError(f"{key} must be a non-negative integer{what}, got {value!r}",
                                  "pass 0 to turn it off")
        if self.lr_schedule not in SCHEDULES:
            raise ConfigError(f"unknown learning-rate schedule {self.lr_schedule!r}",
                              f"use one of {', '.join(SCHEDULES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}", f"use one of {', '.join(OPTIMIZERS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}", f"use one of {', '.join(PRECISIONS)}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"grad_clip must be positive, got {self.grad_clip}",
                              "pass None to turn clipping off")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}", "pass 0 for none")
        if not self.lr > 0:
            raise ConfigError(f"the learning rate must be positive, got {self.lr}", "e.g. --lr 5e-5")
        self.budget()
        self.schedule()

    def budget(self) -> Budget:
        return Budget(self.max_steps, self.max_epochs, self.max_tokens, self.max_time)

    def schedule(self) -> WarmupDecay:
        if self.lr_schedule == "constant":
            return WarmupDecay(self.lr, self.lr, self.warmup_steps)
        min_lr = self.lr / 10 if self.min_lr is None else self.min_lr
        return WarmupDecay(self.lr, min_lr, self.warmup_steps, self.lr_schedule)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


@dataclass
class TrainResult:
    step: int
    tokens: int  # items the loss counted over the whole run (tokens, examples or pairs)
    elapsed: float
    last_eval: dict[str, Any] | None
    sample: str | None
    run_dir: Path | None
