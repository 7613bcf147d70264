"""Rotary position embeddings, rotate-half convention (Hugging Face checkpoints).

Dimension i of a head is paired with dimension i + head_dim/2 and the pair is rotated by
position · θ_i, θ_i = base^(−2i/head_dim).  (Burkov's book rotates adjacent pairs (2i, 2i+1)
instead; the two agree after permuting the rows of W_q and W_k: tests/test_rope.py.)
"""

from __future__ import annotations

import torch

from scratchlm.errors import ConfigError


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind in (None, "default"):
            pass
        elif kind == "linear":
            inv_freq = inv_freq / float(scaling["factor"])
        elif kind == "llama3":
            inv_freq = _llama3_scaling(inv_freq, scaling)
        else:
            raise ConfigError(f"rope scaling type {kind!r} is not implemented", "supported: linear, llama3")
    return inv_freq.float()


def _llama3_scaling(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1's rule: long wavelengths slowed by `factor`, short ones kept, a smooth blend between."""
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    original = float(s["original_max_position_embeddings"])
    wavelen = 2 * torch.pi / inv_freq
    low_wavelen, high_wavelen = original / low, original / high
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    middle = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(middle, blended, out)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos and *signed* sin, both [B, 1, T, head_dim], for integer positions [B, T].

    The sin's first half is negated: rotate_half(x) · sin equals roll(x, head_dim/2) · that
    signed sin, which ``apply_rope`` computes in two ops instead of five (decoding runs it twice
    per layer per token).  The angles are the checkpoint's: position · θ_i in fp32.
    """
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)  # [B, T, hd/2]
    sin = angles.sin()
    angles = torch.cat((angles, angles), dim=-1)[:, None]
    return angles.cos().to(dtype), torch.cat((-sin, sin), dim=-1)[:, None].to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [B, H, T, hd] by the angles in cos / signed sin (rotate-half pairing).

    x · cos + rotate_half(x) · sin, with rotate_half(x) = (−x₂, x₁) written as roll(x) = (x₂, x₁)
    times the signed sin (−sin, sin) of ``rope_cos_sin``: the same products, so the same numbers.
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)
