"""Budgets and the learning-rate schedule.

A run stops at the first of its budgets: steps, epochs, tokens or wall-clock seconds.  Each
budget turns into a *progress* fraction (0 at the start, 1 when it is spent) and the run's
progress is the largest of them.  The cosine decay is a function of that progress rather than of
the step count, so one schedule serves every budget: with ``max_steps`` it is the familiar
step-based cosine; with ``max_time`` the learning rate reaches its floor exactly when the time is
up, whatever speed the machine turns out to have (measured, not guessed, which matters on a
shared machine whose speed changes during the run).

Warmup is counted in steps (it exists to protect the first updates, which are the same whatever
the budget) and multiplies the cosine: ``lr(step, p) = min(1, (step+1)/warmup) · cosine(p)``.
Both inputs are saved with the checkpoint, so a resumed run continues the same curve; with a
step, epoch or token budget the curve is a pure function of the step and therefore bit-exact
across a resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scratchlm.errors import ConfigError


@dataclass(frozen=True)
class Budget:
    """When to stop: any combination of the four limits (at least one)."""

    max_steps: int | None = None
    max_epochs: float | None = None
    max_tokens: int | None = None
    max_time: float | None = None  # seconds of wall-clock time, evaluation and checkpoints included

    def __post_init__(self) -> None:
        limits = {"max_steps": self.max_steps, "max_epochs": self.max_epochs,
                  "max_tokens": self.max_tokens, "max_time": self.max_time}
        if all(v is None for v in limits.values()):
            raise ConfigError("the training run has no budget",
                              "set at least one of max_steps, max_epochs, max_tokens or max_time")
        for name, value in limits.items():
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be positive, got {value!r}", f"pass a positive {name}")

    def progress(self, step: int, epochs: float, tokens: int, elapsed: float) -> float:
        """The fraction of the budget spent: the largest fraction over the limits that are set."""
        fractions = [0.0]
        if self.max_steps is not None:
            fractions.append(step / self.max_steps)
        if self.max_epochs is not None:
            fractions.append(epochs / self.max_epochs)
        if self.max_tokens is not None:
            fractions.append(tokens / self.max_tokens)
        if self.max_time is not None:
            fractions.append(elapsed / self.max_time)
        return max(fractions)

    def describe(self) -> str:
        parts = []
        if self.max_steps is not None:
            parts.append(f"{self.max_steps:,} steps")
        if self.max_epochs is not None:
            parts.append(f"{self.max_epochs:g} epochs")
        if self.max_tokens is not None:
            parts.append(f"{self.max_tokens:,} tokens")
        if self.max_time is not None:
            parts.append(f"{self.max_time:g} s")
        return " or ".join(parts)


@dataclass(frozen=True)
class WarmupDecay:
    """Linear warmup over ``warmup_steps`` steps, times a decay from ``lr`` to ``min_lr`` as progress
    goes 0→1: a half cosine (``shape`` "cosine"), or a straight line ("linear", word2vec.c's)."""

    lr: float
    min_lr: float
    warmup_steps: int = 0
    shape: str = "cosine"

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"learning rate must be positive, got {self.lr}", "pass e.g. --lr 1e-3")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"min_lr {self.min_lr} must be between 0 and lr {self.lr}", "lower min_lr")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}", "pass 0 for no warmup")
        if self.shape not in ("cosine", "linear"):
            raise ConfigError(f"unknown decay {self.shape!r}", "use cosine or linear")

    def __call__(self, step: int, progress: float) -> float:
        """The learning rate for the update that takes the model from ``step`` to ``step + 1``."""
        progress = min(max(progress, 0.0), 1.0)
        if self.shape == "cosine":  # (written as it always was: the same float rounding, run for run)
            rate = self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))
        else:
            rate = self.min_lr + (self.lr - self.min_lr) * (1.0 - progress)
        if self.warmup_steps and step < self.warmup_steps:
            return rate * (step + 1) / self.warmup_steps
        return rate
