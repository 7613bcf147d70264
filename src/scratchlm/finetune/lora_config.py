"""``LoRAConfig``: which linear layers get LoRA adapters, with what rank, alpha and dropout.

Apart from ``finetune.lora`` (which needs torch) so that the CLI builds its options from these
defaults without importing torch.  The semantics are peft's: the update is scaled by alpha / rank.

Raschka's appendix E scales by alpha alone (``alpha * (x @ A @ B)``) and draws A [in, r] with
``kaiming_uniform_``, whose fan-in is then r: its "rank 16, alpha 16" is a scale of 16 and a
larger A than peft's (bound 1/√r instead of 1/√in).  In peft's terms its scale is alpha = 16 · r.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scratchlm.errors import ConfigError

__all__ = ["ALL_LINEAR", "LoRAConfig", "lora_scale"]

ALL_LINEAR = "all-linear"  # peft's name for every linear layer of the blocks (not the LM head)


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """The factor on B A: alpha / r, or alpha / √r with rsLoRA (Kalajdzievski, 2023)."""
    return alpha / (math.sqrt(rank) if rslora else rank)


@dataclass(frozen=True)
class LoRAConfig:
    """Which linear layers get adapters, and their rank, alpha and dropout.

    Defaults are peft's ``LoraConfig`` (r 8, alpha 8, dropout 0, no rsLoRA), with every linear
    layer of the blocks as targets (peft's ``all-linear``; Raschka's appendix E adapts every
    linear layer too).  ``targets`` are Hugging Face module names matched as peft matches them:
    a module is targeted when its full name equals a target or ends with ``"." + target``.  A
    string is split at commas (the CLI's ``--lora-targets q_proj,v_proj``).
    """

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: tuple[str, ...] = (ALL_LINEAR,)
    rslora: bool = False

    def __post_init__(self) -> None:
        targets = self.targets
        if isinstance(targets, str):
            targets = targets.split(",")
        targets = tuple(dict.fromkeys(t.strip() for t in targets if t and t.strip()))
        object.__setattr__(self, "targets", targets)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ConfigError(f"LoRA rank must be a positive integer, got {self.rank!r}",
                              "pass --lora-rank 8 (or another rank of 1 or more)")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"LoRA alpha must be a positive number, got {self.alpha!r}",
                              "pass --lora-alpha 16 (the update is scaled by alpha / rank)")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}",
                              "pass --lora-dropout 0.05 (or 0 for none)")
        if not targets:
            raise ConfigError("no LoRA targets given",
                              f"pass --lora-targets with module names such as q_proj,v_proj, or {ALL_LINEAR}")

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.rslora)
