"""Loss functions for the training loop: ``loss_fn(model, batch) -> LossOutput``.

A loss function returns the *sum* of the per-item losses and how many items it summed (tokens
for language modelling, examples for classification, pairs for preference tuning), not a mean,
and optionally other sums over the same items (``metrics``: correct predictions, rewards).  The
loop adds the sums and counts of every micro-batch on every process and divides once, so gradient
accumulation and data parallelism give the gradient of the whole batch's mean exactly, even when micro-batches
hold different numbers of real tokens (instruction data with masked prompts).

The cross-entropy is computed in float32 whatever the logits' dtype, so a bf16-autocast forward
pass still gets a float32 loss (``cross_entropy_sum``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from scratchlm.errors import ConfigError
from scratchlm.training.logprobs import CHUNK_ELEMENTS, IGNORE_INDEX


@dataclass
class LossOutput:
    """What a loss function returns for one micro-batch.

    ``loss_sum``: the differentiable sum of the per-item losses.  ``count``: how many items it
    summed.  ``metrics``: further sums over the same items (``{"correct": 7}``,
    ``{"rewards/chosen": ...}``), detached or not; the loop adds them over micro-batches and
    processes like the loss, and an evaluator reports each as a mean per item.
    """

    loss_sum: torch.Tensor
    count: torch.Tensor | int
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)


class LossFn(Protocol):
    def __call__(self, model: torch.nn.Module, batch: Any) -> LossOutput: ...


@dataclass(frozen=True)
class GroupedLoss:
    """``loss_fn`` over a batch that comes as a list of padded groups (``data.collate.length_groups``):
    each group's ``LossOutput`` summed (loss, count and every metric), which is the whole batch's,
    as every loss here is a sum over items."""

    loss_fn: LossFn

    def __call__(self, model: torch.nn.Module, groups: Sequence[Any]) -> LossOutput:
        outputs = [self.loss_fn(model, group) for group in groups]
        metrics: dict[str, torch.Tensor | float] = {}
        for out in outputs:
            for key, value in out.metrics.items():
                metrics[key] = metrics[key] + value if key in metrics else value
        return LossOutput(sum(out.loss_sum for out in outputs), sum(out.count for out in outputs), metrics)


class _CrossEntropySum(torch.autograd.Function):
    """Summed cross-entropy of logits [N, V] against targets [N], in float32, a chunk of rows at a time.

    What ``F.cross_entropy(logits.float(), targets, reduction="sum", ignore_index=...)`` computes,
    without its full-size float32 intermediates: that path writes a float32 copy of the logits (in
    bf16), their log-softmax (kept for the backward), a zero-filled gradient for the NLL's
    backward, the log-softmax gradient and then its bf16 cast.  Here the forward keeps only the
    log-sum-exp of each row, and the backward writes softmax − onehot straight into one tensor of
    the logits' dtype, each chunk in float32 while it is in cache.  The peak memory against
    torch's is measured by benchmarks/cross_entropy_memory.py (docs/benchmarks.md); the tests
    hold the values and gradients equal to torch's.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                chunk_rows: int) -> torch.Tensor:
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            torch.logsumexp(logits[rows].float(), dim=-1, out=lse[rows])
        valid = targets != ignore_index
        safe = targets.masked_fill(~valid, 0)
        picked = logits.gather(1, safe[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits, safe, valid, lse)
        ctx.chunk_rows = chunk_rows
        return torch.where(valid, lse - picked, 0.0).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        logits, safe, valid, lse = ctx.saved_tensors
        rows = ctx.chunk_rows
        scale = valid.float() * grad.float()  # d loss / d row loss: 0 for ignored rows
        out = torch.empty_like(logits)
        same = logits.dtype == torch.float32
        for start in range(0, logits.shape[0], rows):
            end = min(start + rows, logits.shape[0])
            # softmax = exp(logit − lse), in float32 (in place in the output when that is float32)
            p = torch.sub(logits[start:end], lse[start:end, None], out=out[start:end] if same else None)
            p.exp_().mul_(scale[start:end, None])
            p.scatter_add_(1, safe[start:end, None], -scale[start:end, None])  # − onehot
            if not same:
                out[start:end].copy_(p)
        return out, None, None, None


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                      chunk_rows: int | None = None) -> torch.Tensor:
    """``F.cross_entropy(logits.float(), targets, ignore_index=..., reduction="sum")``, cheaper.

    logits [N, V] in any float dtype, targets [N]; the loss is float32.  Forward and gradient are
    the same function as torch's (tested against it), computed chunk by chunk (``_CrossEntropySum``).
    """
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    return _CrossEntropySum.apply(logits, targets, ignore_index, chunk_rows)


def split_lm_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` from a tuple/list of two tensors or a dict with ``input_ids`` and ``labels``."""
    if isinstance(batch, dict):
        return batch["input_ids"], batch["labels"]
    inputs, targets = batch
    return inputs, targets


def next_token_loss(model: torch.nn.Module, batch: Any) -> LossOutput:
    """Summed next-token cross-entropy over targets that are not ``IGNORE_INDEX``, and their count.

    ``batch`` holds inputs [B, T] and targets [B, T], the targets already shifted one position
    (what ``SlidingWindowDataset`` yields).
    """
    inputs, targets = split_lm_batch(batch)
    logits, picked = target_logits(model, inputs, targets)
    loss = cross_entropy_sum(logits, picked)
    return LossOutput(loss, (picked != IGNORE_INDEX).sum())


def target_logits(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N, V] and targets [N] of the positions whose target counts.

    Where some targets are ``IGNORE_INDEX`` (masked prompts, padding) and the model exposes its
    final hidden states and ``lm_head``, the head -- the widest matrix product of a small model --
    and the loss over the vocabulary run only on the counted positions.  Exact: a position's
    logits depend on its own hidden state alone.  Otherwise (all positions count, a wrapped or
    headless model) every position's logits, flattened.
    """
    keep = targets != IGNORE_INDEX
    head = getattr(model, "lm_head", None)
    if head is None or bool(keep.all()):
        return model(inputs).flatten(0, 1), targets.flatten()
    hidden = model(inputs, return_hidden=True)
    return head(hidden[keep]), targets[keep]


def classification_loss(model: torch.nn.Module, batch: Any) -> LossOutput:
    """Summed cross-entropy of class logits [B, C] against labels [B], with the correct predictions
    as the ``"accuracy"`` metric (its mean per example is the accuracy).

    ``batch`` is ``(inputs, labels)`` or a dict with ``labels`` and the model's keyword inputs.
    """
    if isinstance(batch, dict):
        labels = batch["labels"]
        logits = model(**{k: v for k, v in batch.items() if k != "labels"})
    else:
        inputs, labels = batch
        logits = model(inputs)
    loss = cross_entropy_sum(logits, labels)
    correct = (logits.detach().argmax(dim=-1) == labels).sum()
    return LossOutput(loss, labels.numel(), {"accuracy": correct})


def answer_loss(model: torch.nn.Module, batch: Any) -> LossOutput:
    """Classification as text: ``model`` gives each label's answer log-probability [B, C]; the loss is
    the negative log-probability of the true label's answer (its tokens only), summed over
    examples, and the ``accuracy`` metric counts examples whose true answer is the most probable.
    """
    labels = batch["labels"]
    scores = model(**{k: v for k, v in batch.items() if k != "labels"})
    loss = -scores.gather(1, labels[:, None]).sum()
    correct = (scores.detach().argmax(dim=-1) == labels).sum()
    return LossOutput(loss, labels.numel(), {"accuracy": correct})


DPO_LOSSES = ("sigmoid", "ipo", "hinge")


def preference_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float, kind: str = "sigmoid",
                    lengths: torch.Tensor | None = None) -> LossOutput:
    """DPO's loss over pairs from the completions' summed log-probabilities, as TRL defines it.

    ``policy`` / ``reference``: [2P] float, the P chosen completions then the P rejected ones
    (one concatenated batch).  With the log-ratios ``c = π(y_w) − π_ref(y_w)`` and
    ``r = π(y_l) − π_ref(y_l)`` and ``d = c − r``, a pair's loss is

    * ``sigmoid`` (Rafailov et al. 2023): ``−log σ(β d)``;
    * ``hinge`` (SLiC): ``max(0, 1 − β d)``;
    * ``ipo`` (Azar et al. 2023): ``(c / n_w − r / n_l − 1 / (2β))²``, each log-ratio averaged over
      its completion's tokens ``lengths`` [2P] (TRL's normalisation, confirmed by the authors).

    Metrics (sums over the pairs): ``rewards/chosen`` = β c, ``rewards/rejected`` = β r,
    ``rewards/margins`` = β d, ``rewards/accuracies`` = pairs with β c > β r, and the policy's
    ``logps/chosen`` / ``logps/rejected``; an evaluator reports each as a mean per pair, which
    are TRL's logged figures.
    """
    if beta <= 0:
        raise ConfigError(f"beta must be positive, got {beta:g}", "pass --beta > 0 (the notebook's is 0.1)")
    ratios = policy.float() - reference.float()
    chosen, rejected = ratios.chunk(2)
    delta = chosen - rejected
    if kind == "sigmoid":
        losses = -torch.nn.functional.logsigmoid(beta * delta)
    elif kind == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif kind == "ipo":
        if lengths is None:
            raise ValueError("the IPO loss needs the completion lengths")
        n_chosen, n_rejected = lengths.float().clamp(min=1.0).chunk(2)
        losses = (chosen / n_chosen - rejected / n_rejected - 1 / (2 * beta)) ** 2
    else:
        raise ConfigError(f"unknown DPO loss {kind!r}", f"use one of {', '.join(DPO_LOSSES)}")
    rewards_chosen, rewards_rejected = beta * chosen.detach(), beta * rejected.detach()
    logps_chosen, logps_rejected = policy.detach().float().chunk(2)
    return LossOutput(losses.sum(), chosen.shape[0], {
        "rewards/chosen": rewards_chosen.sum(), "rewards/rejected": rewards_rejected.sum(),
        "rewards/margins": (rewards_chosen - rewards_rejected).sum(),
        "rewards/accuracies": (rewards_chosen > rewards_rejected).sum(),
        "logps/chosen": logps_chosen.sum(), "logps/rejected": logps_rejected.sum()})


class ReferenceLogProbs(Protocol):
    """The reference model's completion log-prob sums [2P] for a DPO batch (no gradient)."""

    def __call__(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor: ...


def pair_logprobs(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The summed log-probabilities [2P] of the chosen then the rejected completions of a packed DPO
    batch (``finetune.dpo.PairCollate``): one forward, logits at completion tokens only."""
    from scratchlm.training.logprobs import picked_logprobs

    return picked_logprobs(model, batch["input_ids"], batch["picks"], batch["lengths"].shape[0],
                           attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])


@dataclass
class DPOLoss:
    """``loss_fn(model, batch)`` for DPO: the policy's completion log-probs of every pair in one
    forward (``pair_logprobs``), against the reference's, through ``preference_loss``.

    ``batch``: a packed batch of P pairs (``finetune.dpo.PairCollate``) with ``lengths`` [2P]
    (completion tokens) and either ``ref_logps`` [2P] (precomputed) or nothing, and then
    ``reference(model, batch)`` gives them.
    """

    beta: float = 0.1
    kind: str = "sigmoid"
    reference: ReferenceLogProbs | None = None

    def __call__(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        policy = pair_logprobs(model, batch)
        reference = batch.get("ref_logps")
        if reference is None:
            if self.reference is None:
                raise ValueError("a DPO batch without ref_logps needs a reference")
            reference = self.reference(model, batch)
        return preference_loss(policy, reference, self.beta, self.kind, batch["lengths"])
