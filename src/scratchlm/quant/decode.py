"""Decoding a token through a packed transformer (Llama-family or GPT-2 blocks) in one call of the
compiled kernels.

Eagerly, one decoded token costs a packed model ~15 torch operations and 4 packed products per
layer, each a call from Python (SmolLM2-135M: ~450 calls, about as long as its matrix products
take).  ``FusedDecode`` hands the whole token to ``kernels.decode_tokens`` instead: one OpenMP
region runs every layer (norms, RoPE, the cache write, attention, SiLU or GELU and the products
the eager path makes, with the same rounded activations), so the time left is the weights' own.

``quant.linear.stack_projections`` attaches it to a packed ``Transformer`` as
``model.decode_step``; ``Transformer.forward`` asks it first for each cached step and runs its
own layers where it answers None: a model that is not all packed blocks of those two kinds (q/k
norms, a matrix kept in float), more than one new token per row, autograd on, the exact
``"fp32"`` activations, a cache or mask of other shapes, or no compiled kernels.  It reads the
model's tensors afresh for each new cache, so modules swapped between generations are seen.
Tests hold it to the eager model (logits, greedy answers, padded batches, the cache it leaves).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from scratchlm.models.attention import KVCache
from scratchlm.models.layers import RMSNorm, SwiGLUMLP
from scratchlm.quant import kernels, linear
from scratchlm.quant.linear import QuantLinear

__all__ = ["FusedDecode", "decoder_table"]


class FusedDecode:
    """``Transformer.decode_step`` for packed models: the logits [B, 1, V] of one new token per row,
    or None where the eager forward must run (see the module's docstring)."""

    def __init__(self) -> None:
        self._cache: weakref.ref[KVCache] | None = None
        self._table: tuple[kernels.DecoderTable, list[object]] | None = None

    def __call__(self, model: nn.Module, input_ids: torch.Tensor, cache: object,
                 attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                 ) -> torch.Tensor | None:
        activations = linear.ACTIVATIONS
        if (input_ids.dim() != 2 or input_ids.shape[1] != 1 or activations == "fp32" or model.training
                or torch.is_grad_enabled() or not isinstance(cache, KVCache)):
            return None
        if self._cache is None or self._cache() is not cache:  # a new generation: read the model again
            self._table = decoder_table(model) if kernels.kernels_available() else None
            self._cache = weakref.ref(cache)
        keys, values, b, past = cache.keys, cache.values, input_ids.shape[0], cache.length
        if self._table is None:
            return None
        table = self._table[0]
        expected = (table.n_layer, b, table.n_kv_head, cache.max_length, table.head_dim)
        if (keys.dtype != torch.float32 or keys.shape != expected or values.shape != expected
                or values.dtype != torch.float32 or not (keys.is_contiguous() and values.is_contiguous())):
            return None  # (the C reads the cache as this shape: anything else is the eager path's to refuse)
        if past + 1 > cache.max_length:
            raise ValueError(f"KV cache full: {past + 1} positions > {cache.max_length}")
        key_mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape != (b, attention_mask.shape[1]) \
                    or attention_mask.shape[1] < past + 1:
                return None  # a whole 4-D mask, or one that does not cover the keys: the eager forward's
            if not bool(attention_mask[:, :past + 1].all()):
                key_mask = attention_mask.to(torch.int64)
                key_mask = key_mask if key_mask.stride(1) == 1 else key_mask.contiguous()
        if position_ids is None:
            positions = torch.full((b,), past, dtype=torch.int64)
        elif position_ids.numel() != b:
            return None
        else:
            positions = position_ids.reshape(b).to(torch.int64).contiguous()
        x = model.embed(input_ids, past, position_ids).reshape(b, -1).float().contiguous()
        logits = kernels.decode_tokens(table, activations, x, positions, keys, values, past, key_mask)
        cache.advance(1)
        return logits.view(b, 1, -1)


def decoder_table(model: nn.Module) -> tuple[kernels.DecoderTable, list[object]] | None:
    """The C table of a packed ``Transformer`` (Llama-family or GPT-2 blocks) and what it points
    into (the tensors and the layers' array, to be kept alive with it), or None when some part of
    the model is not what ``slm_decode`` runs."""
    config = getattr(model, "config", None)
    if (config is None or config.head_dim % 2 or config.n_head % config.n_kv_head
            or not isinstance(model.lm_head, QuantLinear)):
        return None
    layer_norm, gated = config.norm == "layernorm", config.mlp == "swiglu"
    eps, held = config.norm_eps, []  # type: float, list[object]

    def norm(module: nn.Module) -> tuple[int, int | None] | None:
        if layer_norm:
            if not (isinstance(module, nn.LayerNorm) and module.weight is not None
                    and module.normalized_shape == (config.n_embd,)):
                return None
        elif not isinstance(module, RMSNorm):
            return None
        tensors = [t for t in (module.weight, getattr(module, "bias", None)) if t is not None]
        if module.eps != eps or any(t.dtype != torch.float32 or not t.is_contiguous()
                                    or t.device.type != "cpu" for t in tensors):
            return None
        held.extend(tensors)
        return tensors[0].data_ptr(), tensors[1].data_ptr() if len(tensors) > 1 else None

    def packed(module: nn.Module | None, rows: int, cols: int) -> kernels.LinearTable | None:
        if not isinstance(module, QuantLinear) or (module.out_features, module.in_features) != (rows, cols):
            return None
        bias = module.bias
        held.extend(t for t in (module.blocks, bias) if t is not None)
        return kernels.LinearTable(module.blocks.data_ptr(), None if bias is None else bias.data_ptr(),
                                   rows, cols, kernels.KERNEL_TYPES[module.type_name])

    d, hd, heads, kv_heads = config.n_embd, config.head_dim, config.n_head, config.n_kv_head
    intermediate = config.intermediate_size
    blocks = (kernels.BlockTable * config.n_layer)()
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        if attn.q_norm is not None or isinstance(mlp, SwiGLUMLP) != gated:
            return None
        up = mlp.gate_up_proj if gated else mlp.up_proj
        norms = (norm(layer.input_layernorm), norm(layer.post_attention_layernorm))
        linears = (packed(attn.qkv_proj, (heads + 2 * kv_heads) * hd, d), packed(attn.o_proj, d, heads * hd),
                   packed(up, (1 + gated) * intermediate, d), packed(mlp.down_proj, d, intermediate))
        if any(part is None for part in (*norms, *linears)):
            return None
        blocks[i] = kernels.BlockTable(*norms[0], *norms[1], *linears)
    head, final = packed(model.lm_head, model.lm_head.out_features, d), norm(model.norm)
    if head is None or final is None:
        return None
    inv_freq = None
    if config.positions == "rope":
        inv_freq = model.rope_inv_freq.float().contiguous()
        held.append(inv_freq)
    held.append(blocks)
    table = kernels.DecoderTable(config.n_layer, d, heads, kv_heads, hd, intermediate, layer_norm, gated, eps,
                                 None if inv_freq is None else inv_freq.data_ptr(), blocks, *final, head)
    return table, held
