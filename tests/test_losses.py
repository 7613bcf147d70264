"""The summed cross-entropy against torch's, in the shapes the other tests do not reach: more rows
than vocabulary, chunks that do not divide the rows, ignored rows, bf16 logits; and the dict form
of a language-model batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scratchlm.training.losses import IGNORE_INDEX, cross_entropy_sum, split_lm_batch


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
