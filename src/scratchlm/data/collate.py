"""Batching: turn a list of dataset items into one batch, and move a batch to a device.

A batch is whatever a loss function takes: a tensor, a tuple/list of tensors, or a dict of
them (nested freely).  Objectives whose items have different lengths bring their own collate
(padding, masks); these helpers cover the fixed-shape case, the move to the device, and how a
batch of rows of different lengths is cut into groups that pad less (``length_groups``).
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


def length_groups(lengths: Sequence[int], min_saving: float = 0.1) -> list[list[int]]:
    """A batch's item indices as one group or two, each to be padded to its own longest item.

    Two groups (the items sorted longest first, cut where the padded size is smallest) where that
    saves at least ``min_saving`` of the padded tokens; else one group in the items' order.  A
    loss summed over the groups (``training.losses.GroupedLoss``) is the whole batch's, so the
    cut changes the work, not the result.  Two, not more: each group costs a pass through the
    model whatever its size, and a third saves less than that in random batches of the books'
    data (docs/benchmarks.md, "LoRA classification").
    """
    n = len(lengths)
    order = sorted(range(n), key=lambda i: -lengths[i])
    longest = [lengths[i] for i in order]
    whole = n * longest[0]
    if n < 2:
        return [list(range(n))]
    cost, cut = min((k * longest[0] + (n - k) * longest[k], k) for k in range(1, n))
    if cost > whole * (1 - min_saving):
        return [list(range(n))]
    return [order[:cut], order[cut:]]
