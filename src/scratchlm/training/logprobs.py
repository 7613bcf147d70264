"""Log-probabilities of given tokens: per position, and summed per sequence under a mask.

One place for "how likely is this continuation": perplexity, DPO's policy and reference sums,
multiple-choice scoring and classification-as-text all reduce to

    sum over the target positions t of row b of  log softmax(logits[b, t])[targets[b, t]]

with ``targets`` already shifted one position (the logit at ``t`` predicts ``targets[b, t]``)
and positions that do not count set to ``IGNORE_INDEX``.  The log-softmax is taken in float32
whatever the logits' dtype, a chunk of rows at a time, so a [B, T, V] float32 log-softmax is
never materialised (at V = 50k that would be the largest tensor of the step).  Gradients flow
(DPO trains through these sums); under ``torch.no_grad`` they are plain evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # target id that contributes nothing (padding, masked prompt tokens)

# Rows of logits per chunk: about 2^20 float32 values (4 MB), which stay in cache.
CHUNK_ELEMENTS = 1 << 20


@dataclass
class SequenceLogProbs:
    """Per row: the summed log-probability of its target tokens and how many there were."""

    sum: torch.Tensor  # [B] float32
    count: torch.Tensor  # [B] int64

    @property
    def mean(self) -> torch.Tensor:
        """Per-token average (NaN for a row without targets)."""
        return self.sum / self.count


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                   chunk_rows: int | None = None) -> torch.Tensor:
    """``log p(targets)`` at every position: logits [..., V], targets [...] → float32 [...].

    Positions whose target is ``ignore_index`` get 0, so sums over a row need no mask.
    """
    shape = targets.shape
    flat_logits, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    valid = flat_targets != ignore_index
    safe = flat_targets.masked_fill(~valid, 0)
    rows = chunk_rows or max(1, CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    pieces = []
    for start in range(0, flat_logits.shape[0], rows):
        chunk = flat_logits[start:start + rows].float()
        picked = chunk.gather(1, safe[start:start + rows, None]).squeeze(1)
        pieces.append(picked - torch.logsumexp(chunk, dim=-1))
    out = torch.cat(pieces) if pieces else flat_logits.new_zeros(0, dtype=torch.float32)
    return torch.where(valid, out, 0.0).reshape(shape)


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor,
                      ignore_index: int = IGNORE_INDEX) -> SequenceLogProbs:
    """Per-row sums of ``token_logprobs`` over logits [B, T, V] and targets [B, T], with counts."""
    per_token = token_logprobs(logits, targets, ignore_index)
    return SequenceLogProbs(per_token.sum(dim=-1), (targets != ignore_index).sum(dim=-1))



def picked_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, picks: Sequence[torch.Tensor], n: int,
                    **forward: torch.Tensor) -> torch.Tensor:
    """Sums of chosen tokens' log-probabilities, computing logits only at the positions that count.

    ``picks`` = (rows, cols, targets, owners), each [N]: the logit at ``(rows[k], cols[k])`` scores
    ``targets[k]``, added to sum ``owners[k]`` of the ``n`` returned (float32).  A position may be
    picked twice (two continuations of one prefix).  ``model`` is a decoder with ``return_hidden``
    and ``lm_head`` (``models.Transformer``, also inside a ``DistributedDataParallel`` wrapper,
    whose forward it goes through); ``forward``: its ``attention_mask`` / ``position_ids``.  The
    head (V × D, the largest matrix of a small model) runs on the picked rows only, and no
    [B, T, V] log-softmax is ever made.
    """
    rows, cols, targets, owners = picks
    hidden = model(input_ids, return_hidden=True, **forward)
    head = getattr(model, "module", model).lm_head
    picked = token_logprobs(head(hidden[rows, cols]), targets)
    return picked.new_zeros(n).index_add(0, owners, picked)
