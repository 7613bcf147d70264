"""Causal self-attention (multi-head and grouped-query) with a KV cache.

One module, two paths: ``F.scaled_dot_product_attention`` (fast) and ``naive_attention``
(explicit scores, mask and softmax, as Raschka ch. 3 builds it), which tests hold equal.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.models.config import ModelConfig
from scratchlm.models.layers import RMSNorm
from scratchlm.models.rope import apply_rope


class KVCache:
    """Keys and values of every layer for a batch, preallocated to ``max_length`` positions.

    ``length`` is how many positions are filled; the model advances it once per forward pass,
    after every layer has appended its new keys and values.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_length: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (config.n_layer, batch_size, config.kv_heads, max_length, config.head_size)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.max_length = max_length
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v [B, Hkv, T, hd] for `layer`; return all keys and values so far."""
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache full: {end} positions > {self.max_length}")
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, steps: int) -> None:
        self.length += steps

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows given (e.g. drop finished sequences)."""
        self.keys = self.keys[:, rows]
        self.values = self.values[:, rows]


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """Reference: softmax(q·kᵀ/√d + mask) · v with the mask made explicit (True = may attend).

    q [B, H, T, d]; k, v [B, H, S, d] (already expanded to H heads); mask [B|1, 1, T, S] or None
    for the plain causal case with T == S.
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is None:
        t, s = q.shape[-2], k.shape[-2]
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    weights = F.dropout(weights, p=dropout, training=training)
    return weights @ v


class Attention(nn.Module):
    """Multi-head causal self-attention with separate q/k/v/o projections (HF names)."""

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_size
        self.dropout = config.dropout
        d = config.n_embd
        self.q_proj = nn.Linear(d, self.n_head * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv_head * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv_head * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, d, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.use_naive = False  # tests flip this to run the reference path

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.append(self.layer_index, k, v)
        if self.n_kv_head != self.n_head:
            repeat = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        dropout = self.dropout if self.training else 0.0
        if self.use_naive:
            y = naive_attention(q, k, v, mask, dropout, self.training)
        elif mask is None:
            # Plain causal attention; a single new query (cached decoding) may see every key.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=t > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim))
