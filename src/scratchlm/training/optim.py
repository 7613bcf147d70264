"""The optimizer of a run: AdamW (or plain SGD) over the trainable set, in weight-decay groups.

Weight decay applies to matrices only (embeddings and linear weights); biases and norm scales
are not decayed: shrinking them towards zero has no regularising meaning.  A recipe may instead
give explicit groups (LoRA adapters and a task head, undecayed unless asked).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from scratchlm.training.config import TrainConfig

# A trainable set: parameters (AdamW groups by shape, ``param_groups``) or explicit groups.
ParamGroup = dict[str, Any]


def param_groups(parameters: Iterable[torch.nn.Parameter], weight_decay: float) -> list[ParamGroup]:
    """AdamW groups: matrices (≥ 2 dims: embeddings, linear weights) decay; vectors do not."""
    params = [p for p in parameters if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def optimizer_groups(parameters: Iterable[torch.nn.Parameter] | Sequence[ParamGroup],
            weight_decay: float) -> list[ParamGroup]:
    """The optimizer's groups: explicit groups as given (trainable parameters only, the config's
    weight decay where a group names none), or ``param_groups`` of a flat parameter list."""
    items = list(parameters)
    if items and isinstance(items[0], dict):
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in items]
        return [{"weight_decay": weight_decay, **g} for g in groups if g["params"]]
    return param_groups(items, weight_decay)


def build_optimizer(groups: list[ParamGroup], config: TrainConfig,
                    device: torch.device) -> torch.optim.Optimizer:
    """AdamW or SGD over ``groups``; fused (one kernel for every parameter) on the CPU and CUDA."""
    params = [p for g in groups for p in g["params"]]
    fused = device.type in ("cpu", "cuda") and all(p.dtype.is_floating_point for p in params)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, fused=fused or None)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
                             fused=fused or None)
