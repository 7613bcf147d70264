"""Loss functions for the training loop: ``loss_fn(model, batch) -> (loss_sum, count)``.

A loss function returns the *sum* of the per-item losses and how many items it summed (tokens
for language modelling, examples for classification), not a mean.  The loop adds the sums and
counts of every micro-batch on every process and divides once, so gradient accumulation and
data parallelism give the gradient of the whole batch's mean exactly, even when micro-batches
hold different numbers of real tokens (instruction data with masked prompts).

Logits are turned to float32 before the cross-entropy, so a bf16-autocast forward pass still
gets a float32 loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # target id that contributes no loss (padding, masked prompt tokens)

LossFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, torch.Tensor]]


def split_lm_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` from a tuple/list of two tensors or a dict with ``input_ids`` and ``labels``."""
    if isinstance(batch, dict):
        return batch["input_ids"], batch["labels"]
    inputs, targets = batch
    return inputs, targets


def next_token_loss(model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over targets that are not ``IGNORE_INDEX``, and their count.

    ``batch`` holds inputs [B, T] and targets [B, T], the targets already shifted one position
    (what ``SlidingWindowDataset`` yields).
    """
    inputs, targets = split_lm_batch(batch)
    logits = model(inputs)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (targets != IGNORE_INDEX).sum()
