"""Sliding-window language-model data (Raschka ch. 2): (input, target) pairs cut from one id stream.

Window ``k`` starts at ``k * stride``: ``input = ids[s : s + max_length]`` and ``target`` is the
same span shifted one token right, so every position is trained to predict its next token.
``stride == max_length`` gives disjoint windows; a smaller stride overlaps them.  The ids are held
once as a tensor and windows are views cut on demand, so memory stays O(len(ids)).

This module imports torch; the tokenizer CLI never imports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Dataset

from scratchlm.errors import ConfigError, DataError

if TYPE_CHECKING:
    from scratchlm.tokenizers import Tokenizer


class SlidingWindowDataset(Dataset):
    """Windows of ``max_length`` ids every ``stride`` ids; item ``k`` is ``(input, target)`` LongTensors."""

    def __init__(self, ids: Sequence[int] | torch.Tensor, max_length: int, stride: int):
        if max_length < 1 or stride < 1:
            raise ConfigError(f"max_length and stride must be at least 1 (got {max_length} and {stride})",
                              "pass positive values, e.g. max_length=256, stride=128")
        self.ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        self.max_length, self.stride = max_length, stride
        # Same windows as Raschka's range(0, len(ids) - max_length, stride): each needs a next token.
        self._count = max(0, (len(self.ids) - max_length + stride - 1) // stride)
        if self._count == 0:
            raise DataError(f"the data has {len(self.ids)} tokens, fewer than one window needs "
                            f"({max_length} + 1 for the shifted target)",
                            "use a longer text or a smaller max_length")

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -self._count <= index < self._count:
            raise IndexError(f"window {index} out of range ({self._count} windows)")
        start = (index % self._count) * self.stride
        return self.ids[start:start + self.max_length], self.ids[start + 1:start + self.max_length + 1]


def create_dataloader(
    ids_or_text: str | Sequence[int] | torch.Tensor,
    tokenizer: Tokenizer | str | Path | None = None,
    batch_size: int = 4,
    max_length: int = 256,
    stride: int = 128,
    shuffle: bool = True,
    drop_last: bool = True,
    num_workers: int = 0,
    seed: int = 123,
) -> DataLoader:
    """A DataLoader of ``(inputs, targets)`` batches, each ``[batch_size, max_length]``.

    ``ids_or_text``: token ids, or a text encoded with ``tokenizer`` (a ``Tokenizer`` or anything
    ``scratchlm.tokenizers.load`` opens); special-token strings in the text are encoded as special
    tokens, since a training corpus joins documents with ``<|endoftext|>``.  Shuffling draws from
    its own generator seeded with ``seed``, so the batch order repeats without touching the global RNG.
    """
    if isinstance(ids_or_text, str):
        if tokenizer is None:
            raise ConfigError("a text needs a tokenizer to become ids",
                              "pass tokenizer=... (a Tokenizer or a path), or pass token ids")
        if isinstance(tokenizer, (str, Path)):
            from scratchlm.tokenizers import load

            tokenizer = load(tokenizer)
        ids = tokenizer.encode(ids_or_text, allowed_special="all")
    else:
        ids = ids_or_text
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1 (got {batch_size})", "pass a positive batch_size")
    dataset = SlidingWindowDataset(ids, max_length, stride)
    if drop_last and len(dataset) < batch_size:
        raise DataError(f"only {len(dataset)} windows of {max_length} tokens, "
                        f"fewer than one batch of {batch_size}",
                        "lower batch_size or max_length, raise the data, or pass drop_last=False")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers, generator=generator)
