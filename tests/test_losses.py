"""The summed cross-entropy against torch's, in the shapes the other tests do not reach: more rows
than vocabulary, chunks that do not divide the rows, ignored rows, bf16 logits; and the dict form
of a language-model batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from scratchlm.training.losses import IGNORE_INDEX, LossOutput, cross_entropy_sum, split_lm_batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_rows", [None, 1, 3, 64])
def test_more_rows_than_vocabulary_in_uneven_chunks(dtype, chunk_rows):
    g = torch.Generator().manual_seed(0)
    rows, vocab = 37, 5  # rows > vocab; 37 is no multiple of 3 or 64
    logits = (torch.randn(rows, vocab, generator=g) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[[0, 7, 36]] = IGNORE_INDEX
    ours = cross_entropy_sum(logits, targets, chunk_rows=chunk_rows)
    (grad_ours,) = torch.autograd.grad(ours * 1.5, logits)
    reference = logits.detach().float().requires_grad_()
    theirs = F.cross_entropy(reference, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    (grad_theirs,) = torch.autograd.grad(theirs * 1.5, reference)
    assert ours.dtype == torch.float32 and grad_ours.dtype == dtype
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad_ours.float(), grad_theirs, rtol=tol, atol=tol)
    assert torch.count_nonzero(grad_ours[[0, 7, 36]]) == 0  # ignored rows get no gradient


def test_a_batch_is_a_pair_or_a_dict():
    inputs, labels = torch.arange(6).view(2, 3), torch.arange(6, 12).view(2, 3)
    for batch in ((inputs, labels), [inputs, labels], {"input_ids": inputs, "labels": labels}):
        x, y = split_lm_batch(batch)
        assert x is inputs and y is labels


@given(st.lists(st.integers(1, 200), min_size=1, max_size=16))
def test_length_groups_partition_the_batch_and_never_pad_more(lengths):
    from scratchlm.data.collate import length_groups

    groups = length_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths))) and 1 <= len(groups) <= 2
    padded = sum(len(g) * max(lengths[i] for i in g) for g in groups)
    whole = len(lengths) * max(lengths)
    if len(groups) == 2:
        assert padded <= 0.9 * whole  # a cut must save a tenth of the padded tokens
        assert min(lengths[i] for i in groups[0]) >= max(lengths[i] for i in groups[1])
    else:
        assert groups[0] == list(range(len(lengths)))  # one group keeps the items' order


def test_grouped_loss_sums_every_field():
    from scratchlm.training.losses import GroupedLoss

    def fake(model, batch):
        return LossOutput(torch.tensor(batch * 1.0), batch, {"accuracy": torch.tensor(batch // 2)})

    out = GroupedLoss(fake)(None, [3, 4])
    assert out.loss_sum.item() == 7.0 and out.count == 7 and out.metrics["accuracy"].item() == 3
