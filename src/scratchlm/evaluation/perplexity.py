"""Perplexity of a text under a model, with a sliding window (stride) for texts longer than the context.

Every token after the first is predicted exactly once.  Window ``k`` starts at ``k × stride``
and holds ``context_length`` tokens; it scores only the targets that earlier windows have not
scored, so each scored token sees at least ``context_length − stride`` tokens of context (all of
its context in the first window).  ``stride == context_length`` gives disjoint windows (fast,
but tokens at the start of each window see little context); a smaller stride costs
``context_length / stride`` times more compute and approaches the model's true perplexity.

The result is also given per character (nats and bits), which compares models with different
tokenizers: a total negative log-likelihood divided by the number of characters scored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from scratchlm.errors import ConfigError, DataError
from scratchlm.models.protocols import CausalLM
from scratchlm.runtime import evaluating
from scratchlm.tokenizers import Tokenizer
from scratchlm.training.logprobs import IGNORE_INDEX, sequence_logprobs


@dataclass
class PerplexityResult:
    loss: float  # mean negative log-likelihood per scored token (nats)
    perplexity: float
    tokens: int  # tokens scored (all but the first)
    characters: int  # characters scored (all but those of the first token)
    nats_per_char: float
    bits_per_char: float
    context_length: int
    stride: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def windows(n_tokens: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(start, end, first_scored)`` per window: inputs ``ids[start:end]`` predict ``ids[start+1:end+1]``;
    targets at positions ``first_scored..end`` (inclusive, in token positions) count."""
    spans = []
    scored_up_to = 0  # last target position already scored (position 0 is never a target)
    start = 0
    while scored_up_to < n_tokens - 1:
        end = min(start + context_length, n_tokens - 1)
        spans.append((start, end, scored_up_to + 1))
        scored_up_to = end
        start += stride
    return spans


@torch.no_grad()
def sliding_window_nll(model: CausalLM, ids: Sequence[int] | torch.Tensor, context_length: int,
                       stride: int, batch_size: int = 8) -> tuple[float, int]:
    """Total negative log-likelihood (nats) of ``ids[1:]`` given what precedes them, and the count."""
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    if len(ids) < 2:
        raise DataError(f"the text has {len(ids)} token(s); perplexity needs at least 2",
                        "pass a longer text")
    device = next(model.parameters()).device
    spans = windows(len(ids), context_length, stride)
    total, count = 0.0, 0
    with evaluating(model):
        for i in range(0, len(spans), batch_size):
            chunk = spans[i:i + batch_size]
            width = max(end - start for start, end, _ in chunk)
            inputs = torch.zeros(len(chunk), width, dtype=torch.long)
            targets = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
            for row, (start, end, first) in enumerate(chunk):
                inputs[row, :end - start] = ids[start:end]
                # Targets ids[start+1 .. end]; keep those at positions >= first.
                keep = slice(first - start - 1, end - start)
                targets[row, keep] = ids[first:end + 1]
            scored = sequence_logprobs(model(inputs.to(device)), targets.to(device))
            total -= float(scored.sum.double().sum())
            count += int(scored.count.sum())
    return total, count


def perplexity(model: CausalLM, tokenizer: Tokenizer, text: str, *, context_length: int | None = None,
               stride: int | None = None, batch_size: int = 8) -> PerplexityResult:
    """Sliding-window perplexity of ``text``.

    ``context_length`` defaults to the model's, ``stride`` to half the context length.
    """
    model_context = getattr(getattr(model, "config", None), "context_length", None)
    context_length = model_context if context_length is None else context_length
    if context_length is None:
        raise ConfigError("the model does not say its context length", "pass context_length")
    if context_length < 2:
        raise ConfigError(f"context length {context_length} is too short to predict anything",
                          "pass a context length of 2 tokens or more")
    if model_context is not None and context_length > model_context:
        raise ConfigError(f"context length {context_length} exceeds the model's {model_context} positions",
                          f"pass a context length of at most {model_context}")
    stride = max(1, context_length // 2) if stride is None else stride
    if not 1 <= stride <= context_length:
        raise ConfigError(f"stride {stride} must be between 1 and the context length {context_length}",
                          "a larger stride would skip tokens")
    if batch_size < 1:
        raise ConfigError(f"batch size must be positive, got {batch_size}", "pass e.g. --batch-size 8")
    if not text:
        raise DataError("the text is empty", "pass a text to evaluate")
    ids = tokenizer.encode(text, allowed_special="all")
    total, count = sliding_window_nll(model, ids, context_length, stride, batch_size)
    characters = len(text) - len(tokenizer.decode(ids[:1]))
    loss = total / count
    nats_per_char = total / max(characters, 1)
    return PerplexityResult(
        loss=loss, perplexity=math.exp(loss) if loss < 700 else math.inf, tokens=count, characters=characters,
        nats_per_char=nats_per_char, bits_per_char=nats_per_char / math.log(2),
        context_length=context_length, stride=stride,
    )
