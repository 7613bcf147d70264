"""The model contract: what generation, the serving engine, training and ``scratchlm.load`` rely on.

Every language model here — the ``Transformer`` (GPT-2 and Llama families), the recurrent
``RecurrentLM`` and the count-based n-gram module — satisfies ``CausalLM``; their caches satisfy
``Cache``.  Code that drives a model is typed with these, not with ``Any``, so the contract is
checked in one place (tests/test_models.py holds each model to it) instead of living in
docstrings.

The cache is whatever lets a model continue a batch of sequences without re-reading them: the
transformer's keys and values of every past position (``KVCache``), an RNN's last hidden state
(``RecurrentState``), an n-gram's last N−1 ids (``NGramContext``).  The model reads it, appends
the new positions and advances ``length`` in place during ``forward``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

import torch

from scratchlm.models.config import ModelConfig


@runtime_checkable
class Cache(Protocol):
    """Per-row state of a batch being continued; updated in place by the model's ``forward``."""

    length: int  # positions consumed so far (the same for every row: padding counts)
    max_length: int  # positions it can hold (a recurrent state never fills; the sampler sizes masks by it)

    def advance(self, steps: int) -> None:
        """Count ``steps`` more positions as consumed."""
        ...

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows, in this order (finished sequences leave a batch)."""
        ...


@runtime_checkable
class JoinableCache(Cache, Protocol):
    """A cache whose rows can be stacked into one batch (the serving engine joins requests so)."""

    @classmethod
    def cat(cls, caches: Sequence[JoinableCache]) -> JoinableCache:
        ...


@runtime_checkable
class CausalLM(Protocol):
    """Token ids [B, T] (continuing ``cache`` when given) → next-token logits [B, T, V].

    ``attention_mask`` [B, past + T] marks real tokens (1) and left padding (0) over everything
    the cache holds plus the new ids; ``position_ids`` [B, T] default to past … past + T − 1.
    """

    config: ModelConfig

    def __call__(self, input_ids: torch.Tensor, *, cache: Cache | None = None,
                 attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
        ...

    def new_cache(self, batch_size: int, max_length: int | None = None,
                  dtype: torch.dtype | None = None) -> Cache:
        """An empty cache for ``batch_size`` rows of up to ``max_length`` positions."""
        ...

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]:
        ...

    def eval(self) -> CausalLM:
        ...


@runtime_checkable
class HiddenStatesLM(CausalLM, Protocol):
    """A causal LM that can also return its final (normed) hidden states [B, T, D] instead of logits:
    what a task head (classification) reads."""

    def __call__(self, input_ids: torch.Tensor, *, cache: Cache | None = None,
                 attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                 return_hidden: bool = False) -> torch.Tensor:
        ...
