"""Task heads on a language model: a sequence classifier reading the last real token's hidden state,
and classification as text (the model answers the label word).

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

from scratchlm.errors import CheckpointError, ConfigError
from scratchlm.tokenizers import Tokenizer
from scratchlm.training.logprobs import IGNORE_INDEX, token_logprobs

HEAD_TYPE = "classification"
TEXT_HEAD_TYPE = "label_text"
# Burkov §5.3.2's completion template ("Predict emotion: {text}\nEmotion:"), for any labels.  The
# answer is " " + label + the end-of-text token (the book leaves the space open; we pin it).
DEFAULT_TEMPLATE = "Predict label: {text}\nLabel:"


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

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.score.parameters())

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


class LabelText(nn.Module):
    """Classification as text (Burkov §5.3.2): the language model answers the label after a prompt.

    Each example runs as one row per label — the prompt (``template`` with the text in place of
    ``{text}``) followed by that label's answer tokens — and ``forward`` returns, per example and
    label, the summed log-probability of the answer tokens [B, C] (``training.logprobs``).  The
    loss is the negative of the true label's (``losses.answer_loss``); the prediction is the
    label whose answer is most probable, so nothing is parsed from generated text.  Logits are
    computed at the answer positions only.
    """

    def __init__(self, base: nn.Module, labels: Sequence[str], template: str,
                 answer_ids: Sequence[Sequence[int]]):
        super().__init__()
        if "{text}" not in template:
            raise ConfigError(f"the prompt template {template!r} has no {{text}}",
                              "put {text} where the text goes, e.g. 'Predict label: {text}\\nLabel:'")
        self.base, self.config = base, base.config
        self.labels, self.template = list(labels), template
        self.answer_ids = [list(ids) for ids in answer_ids]

    @classmethod
    def build(cls, base: nn.Module, labels: Sequence[str], template: str, tokenizer: Tokenizer) -> LabelText:
        eos = [tokenizer.eos_id] if getattr(tokenizer, "eos_id", None) is not None else []
        return cls(base, labels, template, [tokenizer.encode(" " + label) + eos for label in labels])

    def spec(self) -> dict[str, Any]:
        return {"type": TEXT_HEAD_TYPE, "labels": self.labels, "template": self.template,
                "answer_ids": self.answer_ids}

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.base.lm_head.parameters())

    def prompt_parts(self, tokenizer: Tokenizer, text: str) -> tuple[list[int], list[int]]:
        """Token ids of the template before and after the text (tokenized apart from it, so a text
        cut to fit the context never changes the prompt's own tokens)."""
        before, after = self.template.split("{text}", 1)
        return tokenizer.encode(before) if before else [], tokenizer.encode(after) if after else []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                targets: torch.Tensor, hidden: torch.Tensor | None = None,
                start_layer: int = 0) -> torch.Tensor:
        """Answer log-probabilities [B, C] for rows [B·C, T] (right-padded) and their answer targets."""
        states = self.base.hidden_states(input_ids, start_layer=start_layer, hidden=hidden)
        where = targets != IGNORE_INDEX
        logp = token_logprobs(self.base.lm_head(states[where]), targets[where])
        rows = torch.arange(len(input_ids), device=input_ids.device)[:, None].expand_as(targets)[where]
        sums = torch.zeros(len(input_ids), dtype=logp.dtype, device=logp.device).index_add(0, rows, logp)
        return sums.view(-1, len(self.labels))


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
    kind = spec.get("type")
    if kind not in (HEAD_TYPE, TEXT_HEAD_TYPE):
        raise CheckpointError(f"unknown head type {kind!r} in the run dir",
                              f"this scratchlm knows {HEAD_TYPE!r} and {TEXT_HEAD_TYPE!r}; upgrade scratchlm")
    labels = spec.get("labels")
    if not isinstance(labels, list) or len(labels) < 2:
        raise CheckpointError("the classification head lists no labels", "restore config.json")
    labels = [str(label) for label in labels]
    if kind == HEAD_TYPE:
        return SequenceClassifier(model, labels)
    answers = spec.get("answer_ids")
    if not isinstance(spec.get("template"), str) or not isinstance(answers, list) \
            or len(answers) != len(labels):
        raise CheckpointError("the label-text head has no template or answer tokens", "restore config.json")
    return LabelText(model, labels, spec["template"], answers)
