"""What trains when a language model is finetuned: every weight, its last blocks, or LoRA adapters.

One place for the choice ``finetune instruct`` and ``finetune dpo`` share (a classifier's head
has its own: ``finetune.classify.trainable_set``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from scratchlm.errors import ConfigError
from scratchlm.finetune.lora_config import LoRAConfig

TRAIN_MODES = ("all", "lora", "last-blocks")


def trainable_groups(model: nn.Module, mode: str, weight_decay: float, *, last_blocks: int = 1,
                     lora: LoRAConfig | None = None) -> list[dict[str, Any]]:
    """Freeze the model, unfreeze what ``mode`` trains, and return the optimizer's groups."""
    from scratchlm.training.optim import param_groups

    if mode not in TRAIN_MODES:
        raise ConfigError(f"unknown --train {mode!r}", f"use one of {', '.join(TRAIN_MODES)}")
    if mode == "lora":
        from scratchlm.finetune.lora import apply_lora, lora_param_groups

        model.requires_grad_(False)
        apply_lora(model, lora or LoRAConfig())
        return lora_param_groups(model, weight_decay=0.0)
    model.requires_grad_(mode == "all")
    if mode == "last-blocks":
        layers = model.layers
        if not 1 <= last_blocks <= len(layers):
            raise ConfigError(f"--train last-blocks {last_blocks}: the model has {len(layers)} blocks",
                              f"pass a number from 1 to {len(layers)}")
        for layer in layers[-last_blocks:]:
            layer.requires_grad_(True)
        model.norm.requires_grad_(True)
    return param_groups([p for p in model.parameters() if p.requires_grad], weight_decay)
