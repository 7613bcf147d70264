"""Task heads on a language model: a sequence classifier reading the last real token's hidden state.

Raschka ch. 6 replaces GPT-2's output layer by a small linear layer and classifies a text by the
output at its **last** token: in a causal model that is the only position that has seen the whole
text.  ``SequenceClassifier`` does the same on any ``HiddenStatesLM`` (the transformer), with
the head named ``score`` as in ``transformers``' ``*ForSequenceClassification``.

Padding: the last real token of each row is found from ``attention_mask`` (1 = real), never by
comparing ids with a pad id, so a pad token that is also the end-of-text token (GPT-2, SmolLM2)
cannot be mistaken for padding when a text ends with it.  Right padding needs no mask inside the
model (causal attention: padding after a token never reaches it); left padding is masked and
its positions counted from the first real token, so both give the same logits (tested).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from scratchlm.errors import CheckpointError

HEAD_TYPE = "classification"


class SequenceClassifier(nn.Module):
    """``base`` (a transformer) → final hidden state at each row's last real token → ``score`` → [B, C]."""

    def __init__(self, base: nn.Module, labels: Sequence[str]):
        super().__init__()
        if not hasattr(base, "hidden_states"):
            raise CheckpointError(f"a classification head needs a transformer, not a {type(base).__name__}",
                                  "finetune a transformer model (GPT-2 or Llama family)")
        self.base = base
        self.config = base.config
        self.labels = list(labels)
        weight = base.embed_tokens.weight
        self.score = nn.Linear(base.config.n_embd, len(self.labels), bias=False, device=weight.device,
                               dtype=weight.dtype)

    def spec(self) -> dict[str, Any]:
        """The run-dir manifest's ``head`` entry (``checkpoint.io.RunManifest``)."""
        return {"type": HEAD_TYPE, "labels": self.labels, "pooling": "last_token"}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                hidden: torch.Tensor | None = None, start_layer: int = 0) -> torch.Tensor:
        """Class logits [B, C] for ids [B, T]; ``attention_mask`` [B, T] marks real tokens (1).

        ``hidden`` / ``start_layer``: the states after the first ``start_layer`` layers, computed
        before (a frozen prefix), so only the remaining layers run.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        left_padded = bool((attention_mask[:, 0] == 0).any())
        mask = position_ids = None
        if left_padded:
            mask = attention_mask
            position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        states = self.base.hidden_states(input_ids, start_layer=start_layer, hidden=hidden,
                                         attention_mask=mask, position_ids=position_ids)
        return self.score(pool_last(states, attention_mask))


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (the last 1 of the mask), for left or right padding."""
    t = attention_mask.shape[1]
    positions = torch.arange(t, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, -1).amax(dim=1)


def pool_last(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """states [B, T, D] at each row's last real token → [B, D]."""
    rows = torch.arange(states.shape[0], device=states.device)
    return states[rows, last_positions(attention_mask)]


def attach_head(model: nn.Module, spec: Mapping[str, Any]) -> nn.Module:
    """The model with the head a run dir's manifest describes (its weights are loaded afterwards)."""
    if spec.get("type") != HEAD_TYPE:
        raise CheckpointError(f"unknown head type {spec.get('type')!r} in the run dir",
                              f"this scratchlm knows the {HEAD_TYPE!r} head; upgrade scratchlm")
    labels = spec.get("labels")
    if not isinstance(labels, list) or len(labels) < 2:
        raise CheckpointError("the classification head lists no labels", "restore config.json")
    return SequenceClassifier(model, [str(label) for label in labels])
