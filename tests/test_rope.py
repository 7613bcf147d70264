"""RoPE: our rotate-half rotation against Burkov's adjacent-pair formulation, written out here.

rope.py's docstring claims the two agree once the rows of W_q and W_k are permuted; this is that
claim as a test (an independent, loop-by-loop implementation of the adjacent-pair rotation)."""

from __future__ import annotations

import math

import torch

from scratchlm.models.rope import apply_rope, inverse_frequencies, rope_cos_sin


def adjacent_pair_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Burkov's RoPE on [T, d]: dims (2i, 2i+1) at position p rotated by p · theta^(-2i/d)."""
    out = x.clone()
    T, d = x.shape
    for p in range(T):
        for i in range(d // 2):
            angle = p * theta ** (-2 * i / d)
            a, b = x[p, 2 * i].item(), x[p, 2 * i + 1].item()
            out[p, 2 * i] = a * math.cos(angle) - b * math.sin(angle)
            out[p, 2 * i + 1] = a * math.sin(angle) + b * math.cos(angle)
    return out


def test_rotate_half_equals_adjacent_pairs_after_permuting_dimensions():
    T, d, theta = 7, 16, 10000.0
    x = torch.randn(T, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cos, sin = rope_cos_sin(inverse_frequencies(d, theta), torch.arange(T)[None], torch.float64)
    ours = apply_rope(x[None, None], cos, sin)[0, 0]
    # rotate-half pairs dims (i, i + d/2); the adjacent layout puts them at (2i, 2i + 1)
    perm = torch.stack([torch.arange(d // 2), torch.arange(d // 2) + d // 2], dim=1).flatten()
    torch.testing.assert_close(ours[:, perm], adjacent_pair_rope(x[:, perm], theta), rtol=1e-6, atol=1e-6)


def test_attention_scores_agree_with_permuted_query_and_key_rows():
    """The same permutation of W_q's and W_k's rows (per head) gives the same q·k scores."""
    T, d_model, d, theta = 6, 12, 8, 500.0
    g = torch.Generator().manual_seed(1)
    h = torch.randn(T, d_model, dtype=torch.float64, generator=g)
    w_q, w_k = (torch.randn(d, d_model, dtype=torch.float64, generator=g) for _ in range(2))
    cos, sin = rope_cos_sin(inverse_frequencies(d, theta), torch.arange(T)[None], torch.float64)
    q, k = (apply_rope((h @ w.T)[None, None], cos, sin)[0, 0] for w in (w_q, w_k))
    perm = torch.stack([torch.arange(d // 2), torch.arange(d // 2) + d // 2], dim=1).flatten()
    q_b, k_b = (adjacent_pair_rope(h @ w[perm].T, theta) for w in (w_q, w_k))
    torch.testing.assert_close(q @ k.T, q_b @ k_b.T, rtol=1e-6, atol=1e-6)
    assert (q @ k.T - (h @ w_q.T) @ (h @ w_k.T).T).abs().max() > 0.1  # the rotation did something
