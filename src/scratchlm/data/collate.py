"""Batching: turn a list of dataset items into one batch, and move a batch to a device.

A batch is whatever a loss function takes: a tensor, a tuple/list of tensors, or a dict of
them (nested freely).  Objectives whose items have different lengths bring their own collate
(padding, masks); these two helpers cover the fixed-shape case and the move to the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def stack_collate(items: Sequence[Any]) -> Any:
    """Stack a list of examples field by field: tensors, tuples/lists of tensors, or dicts of tensors."""
    first = items[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(list(items))
    if isinstance(first, dict):
        return {k: stack_collate([item[k] for item in items]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(stack_collate(list(field)) for field in zip(*items, strict=True))
    return torch.as_tensor(list(items))


def to_device(batch: Any, device: torch.device) -> Any:
    """The same nested batch with every tensor on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
