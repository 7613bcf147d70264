"""The per-sequence log-probability helper against a direct float64 computation."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlm.training.logprobs import IGNORE_INDEX, sequence_logprobs, token_logprobs


def direct(logits: torch.Tensor, targets: torch.Tensor) -> tuple[list[float], list[int]]:
    sums, counts = [], []
    for row_logits, row_targets in zip(logits.double(), targets, strict=True):
        total, n = 0.0, 0
        for t, target in enumerate(row_targets.tolist()):
            if target != IGNORE_INDEX:
                total += float(torch.log_softmax(row_logits[t], -1)[target])
                n += 1
        sums.append(total)
        counts.append(n)
    return sums, counts


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(1, 6), st.integers(2, 9), st.integers(0, 2**31 - 1))
def test_sequence_logprobs_equal_a_direct_sum(batch, length, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=g) * 3
    targets = torch.randint(0, vocab, (batch, length), generator=g)
    targets[torch.rand(batch, length, generator=g) < 0.3] = IGNORE_INDEX
    out = sequence_logprobs(logits, targets)
    sums, counts = direct(logits, targets)
    assert out.sum.dtype == torch.float32
    expected = torch.tensor(sums, dtype=torch.float64)
    torch.testing.assert_close(out.sum.double(), expected, atol=1e-5, rtol=1e-6)
    assert out.count.tolist() == counts


def test_chunking_and_bf16_logits_are_computed_in_float32():
    logits = torch.randn(2, 7, 11)
    targets = torch.randint(0, 11, (2, 7))
    whole = token_logprobs(logits, targets)
    chunked = token_logprobs(logits, targets, chunk_rows=3)
    torch.testing.assert_close(whole, chunked)
    half = token_logprobs(logits.bfloat16(), targets)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, token_logprobs(logits.bfloat16().float(), targets))


def test_gradients_match_torch_cross_entropy():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    targets = torch.randint(0, 7, (2, 5))
    targets[0, :2] = IGNORE_INDEX
    (-sequence_logprobs(logits, targets, ).sum.sum()).backward(inputs=[logits])
    ours = logits.grad.clone()
    logits.grad = None
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").backward()
    torch.testing.assert_close(ours, logits.grad)
