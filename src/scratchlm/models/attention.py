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

    ``keys`` / ``values`` are [n_layer, B, Hkv, max_length, hd]; ``length`` is how many positions
    are filled.  The model advances it once per forward pass, after every layer has appended its
    new keys and values.  Appending copies into the preallocated tensors (no ``torch.cat``).
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_length: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (config.n_layer, batch_size, config.n_kv_head, max_length, config.head_dim)
        self._set(*(torch.zeros(shape, device=device, dtype=dtype) for _ in range(2)))
        self.max_length = max_length
        self.length = 0

    def _set(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Hold new key/value tensors, with per-layer views made once: indexing [layer, :, :, a:b]
        on every append costs more than the copy."""
        self.keys, self.values = keys, values
        self._layer_keys, self._layer_values = _layer_views(keys), _layer_views(values)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v [B, Hkv, T, hd] for `layer`; return all keys and values so far."""
        start, t = self.length, k.shape[2]
        end = start + t
        if end > self.max_length:
            raise ValueError(f"KV cache full: {end} positions > {self.max_length}")
        keys, values = self._layer_keys[layer], self._layer_values[layer]
        keys.narrow(2, start, t).copy_(k)
        values.narrow(2, start, t).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def advance(self, steps: int) -> None:
        self.length += steps

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows given (e.g. drop finished sequences)."""
        self._set(self.keys[:, rows], self.values[:, rows])


def _layer_views(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One view per layer.  Not ``unbind``: its views may not be written in place with autograd on,
    and a caller may run the model with a cache outside ``torch.no_grad``."""
    return tuple(tensor[i] for i in range(tensor.shape[0]))


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
    """Multi-head causal self-attention with separate q/k/v/o projections (HF names).

    ``generation.packed`` may replace q/k/v_proj by one ``qkv_proj`` (their weights stacked, for
    inference): one matrix product per token instead of three, and one RoPE call for q and k.
    """

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.dropout = config.dropout
        d = config.n_embd
        self.q_proj = nn.Linear(d, self.n_head * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv_head * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv_head * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, d, bias=config.o_bias)
        self.qkv_proj: nn.Module | None = None
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.use_naive = False  # tests flip this to run the reference path

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        h, hkv, hd = self.n_head, self.n_kv_head, self.head_dim
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x).view(b, t, h + 2 * hkv, hd).transpose(1, 2)
            if rope is not None and self.q_norm is None:  # q and k rotated together
                q, k = apply_rope(qkv[:, :h + hkv], *rope).split((h, hkv), dim=1)
                rope = None
            else:
                q, k = qkv[:, :h], qkv[:, h:h + hkv]
            v = qkv[:, h + hkv:]
        else:
            q = self.q_proj(x).view(b, t, h, hd).transpose(1, 2)
            k = self.k_proj(x).view(b, t, hkv, hd).transpose(1, 2)
            v = self.v_proj(x).view(b, t, hkv, hd).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.append(self.layer_index, k, v)
        dropout = self.dropout if self.training else 0.0
        # Grouped-query attention: SDPA reads each kv head for its group of query heads
        # (enable_gqa) without copying.  On CUDA only flash attention does that, and it takes no
        # mask, so a masked call there (and the naive path) repeats the kv heads instead.
        gqa = hkv != h
        if gqa and (self.use_naive or (mask is not None and q.device.type != "cpu")):
            k, v = k.repeat_interleave(h // hkv, dim=1), v.repeat_interleave(h // hkv, dim=1)
            gqa = False
        if self.use_naive:
            y = naive_attention(q, k, v, mask, dropout, self.training)
        else:
            y = attend(q, k, v, mask, dropout, gqa)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, h * hd))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           dropout: float = 0.0, gqa: bool = False) -> torch.Tensor:
    """The fast path: ``F.scaled_dot_product_attention`` (causal when ``mask`` is None; a single
    new query, as in cached decoding, sees every key), except for grouped-query bfloat16 training
    on the CPU, which runs ``grouped_attention``: there torch's CPU flash-attention backward is
    slower than plain matrix products on CPUs without AMX (docs/benchmarks.md, "LoRA training
    step").  Not for one query head per kv head (GPT-2), where flash attention is as fast from a
    few hundred positions on, nor beyond ``GROUPED_MAX_SCORES`` query-key pairs, where its memory
    saving wins.
    """
    device = q.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else q.dtype
    if (gqa and dtype == torch.bfloat16 and device == "cpu" and q.requires_grad
            and q.shape[-2] * k.shape[-2] <= GROUPED_MAX_SCORES):
        return grouped_attention(q, k, v, mask, dropout, training=dropout > 0)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=q.shape[-2] > 1,
                                              enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=gqa)


GROUPED_MAX_SCORES = 1024 * 1024


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """``naive_attention`` for grouped-query heads without repeating k and v: the query heads
    that share a kv head are one [group · T, d] matrix, so one product per kv head reads its keys
    (and values) once.  Scores, mask and softmax in float32; the products in the inputs' dtype
    (or autocast's).

    q [B, H, T, d]; k, v [B, Hkv, S, d] with H a multiple of Hkv, query head j reading kv head
    j // (H / Hkv) (``repeat_interleave``'s order); mask as for ``naive_attention``.
    """
    b, h, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    group = h // hkv
    scores = (q.reshape(b, hkv, group * t, d) @ k.transpose(-2, -1)).view(b, hkv, group, t, s)
    scores = scores.float() / math.sqrt(d)
    if mask is None:
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
    else:
        mask = mask[:, :, None]  # [B|1, 1, 1, T, S]: the same for every head
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).to(q.dtype)
    weights = F.dropout(weights, p=dropout, training=training)
    return (weights.view(b, hkv, group * t, s) @ v).view(b, h, t, d)
