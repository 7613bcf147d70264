"""Linear layers and embeddings whose weights stay packed in GGML blocks (Q8_0, Q4_0, Q4_1, and
Q4_K / Q6_K re-blocked without loss).

Decoding one token reads every weight once, so on a CPU its time is mostly the bytes of weights:
a 4.5-bit Q4_1 weight read in place costs a quarter of an fp16 one.  ``QuantLinear`` holds W as
the file's own blocks (``blocks``: uint8 [out_features, in_features/32 · block bytes], the rows of
a GGUF tensor in torch order) and computes ``x Wᵀ + b`` without materialising W:

Q4_K and Q6_K (the types of ``Q4_K_M`` files) are re-blocked at load into blocks of 32 with fp32
scales (``kernels.reblock``: 6 and 10 bits per weight instead of 4.5 and 6.6, the same values).

* up to ``DECODE_TOKENS`` rows of x (decoding, batched decoding): the compiled kernel
  (``quant.kernels``) with integer activations, as llama.cpp computes: each token's x rounded per
  block of 32 (an fp32 scale per block), each weight block's exact integer dot products with it
  scaled in fp32.  ``ACTIVATIONS`` picks the rounding: ``"int15"`` (the default: |q| ≤
  16256, two byte products per weight), ``"int8"`` (llama.cpp's own, a little faster, but
  SmolLM2's greedy answers change, as llama.cpp's do) or ``"fp32"`` (no rounding: the dequantized
  weights' product up to fp32 rounding of the sums, markedly slower; docs/benchmarks.md).  Per
  output the integer paths differ from the fp32 product by at most ``√32/(2L) · ‖w_row‖ · ‖x‖``
  (L = 16256 or 127), and a token's outputs do not depend on the other tokens of its batch; the
  tests bound both, and check SmolLM2's greedy answers against the dequantized fp32 model;
* more rows (prefill): the same rounding and integer arithmetic as a matrix product
  (``kernels.qgemm``: W expanded 16 rows at a time to int16, AVX512-VNNI's vpdpwssd), faster than
  torch's fp32 and fp16 products.  Where that kernel is missing (no compiler, no AVX512-VNNI),
  ``PREFILL_ROWS`` rows of W at a time dequantized exactly to fp32 and multiplied by torch's
  matmul with x rounded as the kernels round it (``round_activations``): the same numbers up to
  fp32 rounding of the sums.  With ``"fp32"`` activations that product, x as it is.

A packed ``Transformer`` (Llama-family or GPT-2 blocks) decodes each token in one call through
every layer (``quant.decode``, attached by ``stack_projections``), with these products'
arithmetic.

``QuantEmbedding`` looks rows up in the same blocks (a tied LM head shares them with the
embedding: SmolLM2's Q8_0 ``token_embd`` is a fifth of the file).  The model is for inference
only: blocks are buffers, not parameters, and have no gradients.

``quantize_model(model, "q4_1")`` rounds a float model's linear weights (and embedding) into
blocks as llama.cpp does (``quant.formats.quantize``); ``checkpoint.gguf`` builds these layers
straight from a file's blocks (``load(path, dtype="gguf")``).
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from scratchlm.errors import ConfigError
from scratchlm.quant.formats import FORMATS, QUANTIZABLE, quantize
from scratchlm.quant.kernels import (
    KERNEL_BLOCK_BYTES,
    KERNEL_TYPES,
    dequantize_rows,
    qgemm,
    qmatmul,
    round_activations,
)

__all__ = ["QuantLinear", "QuantEmbedding", "quantize_model", "weight_bytes", "is_quantized",
           "QUANT_TYPES", "DECODE_TOKENS", "PREFILL_ROWS", "ACTIVATIONS"]

QUANT_TYPES = tuple(KERNEL_TYPES)  # the block types kept packed
DECODE_TOKENS = 8  # up to this many rows of x go through the in-place kernel
# How the products round the activations (kernels.ACTIVATION_MODES: "int15", "int8" or exact "fp32"), read
# at each call: set it, or SCRATCHLM_ACTIVATIONS before the import.
ACTIVATIONS = os.environ.get("SCRATCHLM_ACTIVATIONS") or "int15"
PREFILL_ROWS = 2048  # rows of W dequantized at a time for a prefill matmul (2048 × 576 fp32: 4.7 MB)


def _check_blocks(blocks: torch.Tensor, type_name: str, rows: int, cols: int) -> torch.Tensor:
    if type_name not in KERNEL_TYPES:
        raise ValueError(f"{type_name} weights are not kept packed; packed types: {', '.join(QUANT_TYPES)}")
    if cols % FORMATS[type_name].per_block or blocks.dtype != torch.uint8 or \
            blocks.numel() != rows * (cols // 32) * KERNEL_BLOCK_BYTES[type_name]:
        raise ValueError(f"{blocks.numel()} bytes are not a [{rows}, {cols}] {type_name} matrix")
    return blocks.reshape(rows, -1).contiguous()


class QuantLinear(nn.Module):
    """``y = x Wᵀ + b`` with W in GGML blocks (``blocks``), read in place when decoding."""

    def __init__(self, blocks: torch.Tensor, type_name: str, in_features: int, out_features: int,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.type_name, self.in_features, self.out_features = type_name, in_features, out_features
        self.register_buffer("blocks", _check_blocks(blocks, type_name, out_features, in_features))
        self.register_buffer("bias", None if bias is None else bias.detach().float().cpu().contiguous())

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, type_name: str) -> QuantLinear:
        """Quantize ``weight`` [out, in] as llama.cpp rounds it."""
        values = weight.detach().float().cpu().numpy()
        blocks = torch.from_numpy(quantize(values, type_name).reshape(-1))
        return cls(blocks, type_name, values.shape[1], values.shape[0], bias)

    @classmethod
    def stacked(cls, parts: list[QuantLinear]) -> QuantLinear:
        """One matrix for several projections of the same input (q/k/v, gate/up): rows concatenated."""
        biases = [p.bias for p in parts]
        bias = None if all(b is None for b in biases) else torch.cat(
            [b if b is not None else torch.zeros(p.out_features) for b, p in zip(biases, parts, strict=True)])
        return cls(torch.cat([p.blocks for p in parts]), parts[0].type_name, parts[0].in_features,
                   sum(p.out_features for p in parts), bias)

    def dequantized(self) -> torch.Tensor:
        """W as float32 [out, in], exactly the values ``gguf.quants.dequantize`` gives."""
        return dequantize_rows(self.blocks, self.type_name, self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A token makes ~120 of these calls, so the decode path skips what costs most per call:
        # Module.__getattr__ for the buffers, reshape and view (qmatmul takes x's own shape).
        blocks, bias = self._buffers["blocks"], self._buffers["bias"]
        if x.dtype == torch.float32 and x.is_contiguous() and x.shape[-1] == self.in_features \
                and x.numel() <= DECODE_TOKENS * self.in_features:
            y = qmatmul(blocks, self.type_name, self.out_features, self.in_features, x, ACTIVATIONS)
            if bias is not None:
                y += bias
            return y
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float().contiguous()
        if x2.shape[0] <= DECODE_TOKENS:
            y = qmatmul(blocks, self.type_name, self.out_features, self.in_features, x2, ACTIVATIONS)
        else:
            exact = ACTIVATIONS == "fp32"
            y = None if exact else qgemm(blocks, self.type_name, self.out_features, self.in_features, x2,
                                         ACTIVATIONS)
            if y is None:
                y = self._dequantized_product(x2 if exact else round_activations(x2, ACTIVATIONS))
        if bias is not None:
            y += bias
        y = y.view(*shape[:-1], self.out_features)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def _dequantized_product(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, in] @ Wᵀ exactly: ``PREFILL_ROWS`` rows of W at a time dequantized to fp32."""
        y = torch.empty(x.shape[0], self.out_features)
        for start in range(0, self.out_features, PREFILL_ROWS):
            rows = min(PREFILL_ROWS, self.out_features - start)
            w = dequantize_rows(self.blocks, self.type_name, self.out_features, self.in_features,
                                torch.arange(start, start + rows))
            y[:, start:start + rows] = x @ w.T
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights={self.type_name}"


class QuantEmbedding(nn.Module):
    """Token embedding whose table is GGML blocks: a lookup dequantizes only the rows it reads."""

    def __init__(self, blocks: torch.Tensor, type_name: str, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.type_name, self.num_embeddings, self.embedding_dim = type_name, num_embeddings, embedding_dim
        self.register_buffer("blocks", _check_blocks(blocks, type_name, num_embeddings, embedding_dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = dequantize_rows(self.blocks, self.type_name, self.num_embeddings, self.embedding_dim,
                               ids.reshape(-1).cpu())
        return rows.reshape(*ids.shape, self.embedding_dim)

    def as_linear(self) -> QuantLinear:
        """The tied LM head: the same blocks (no copy) as a ``QuantLinear``."""
        return QuantLinear(self.blocks, self.type_name, self.embedding_dim, self.num_embeddings)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, weights={self.type_name}"


def stack_projections(model: nn.Module) -> None:
    """q/k/v and gate/up as one ``QuantLinear`` each where they share a type (fewer calls per token),
    and a ``Transformer``'s decoding steps handed to ``quant.decode.FusedDecode`` (one call per token
    where every layer is packed)."""
    from scratchlm.models.attention import Attention
    from scratchlm.models.layers import SwiGLUMLP
    from scratchlm.models.transformer import Transformer
    from scratchlm.quant.decode import FusedDecode

    for module in model.modules():
        if isinstance(module, Attention) and module.qkv_proj is None:
            parts = [module.q_proj, module.k_proj, module.v_proj]
            if all(isinstance(p, QuantLinear) and p.type_name == parts[0].type_name for p in parts):
                module.qkv_proj = QuantLinear.stacked(parts)
                module.q_proj = module.k_proj = module.v_proj = None
        elif isinstance(module, SwiGLUMLP) and module.gate_up_proj is None:
            parts = [module.gate_proj, module.up_proj]
            if all(isinstance(p, QuantLinear) and p.type_name == parts[0].type_name for p in parts):
                module.gate_up_proj = QuantLinear.stacked(parts)
                module.gate_proj = module.up_proj = None
    if isinstance(model, Transformer):
        model.decode_step = FusedDecode()


def quantize_model(model: nn.Module, type_name: str) -> nn.Module:
    """Every ``nn.Linear`` (and a transformer's token embedding) of a CPU model in ``type_name``
    blocks, in place; returns the model.

    A matrix whose rows do not fill whole blocks stays in float, and one warning names them; a
    model with no matrix that can be quantized is a ``ConfigError``.
    """
    type_name = type_name.upper()
    if type_name not in QUANTIZABLE:
        raise ConfigError(f"cannot quantize to {type_name.lower()}",
                          f"use one of {', '.join(t.lower() for t in QUANTIZABLE)}")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ConfigError("quantized weights run on the CPU", "load the model with --device cpu")
    per_block, kept = FORMATS[type_name].per_block, []
    embedding = getattr(model, "embed_tokens", None)
    tied = embedding is not None and getattr(model, "lm_head", None) is not None and \
        model.lm_head.weight is embedding.weight
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    if isinstance(embedding, nn.Embedding):
        targets.append((model, "embed_tokens", embedding))
    done = 0
    for parent, name, child in targets:
        if child.weight.shape[1] % per_block:
            kept.append(f"{_name_of(model, child)} {list(child.weight.shape)}")
            continue
        if isinstance(child, nn.Embedding):
            q = QuantLinear.from_float(child.weight, None, type_name)
            setattr(parent, name, QuantEmbedding(q.blocks, type_name, *child.weight.shape))
        elif not (tied and parent is model and name == "lm_head"):
            setattr(parent, name, QuantLinear.from_float(child.weight, child.bias, type_name))
        done += 1
    if tied and isinstance(model.embed_tokens, QuantEmbedding):
        model.lm_head = model.embed_tokens.as_linear()
    if done == 0:
        raise ConfigError(f"no weight matrix of this model has rows that fill {type_name} blocks of "
                          f"{per_block} values ({', '.join(kept[:3])})", "load it without --quantize")
    if kept:
        warnings.warn(f"kept in float (rows are not a multiple of {per_block}): {', '.join(kept)}",
                      stacklevel=2)
    stack_projections(model)
    release_freed_memory()
    return model.eval()


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next((name for name, m in model.named_modules() if m is module), "?")


def release_freed_memory() -> None:
    """Hand the heap's freed pages back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    Packing frees the file's copies and the float weights it replaces, mostly in blocks of a few
    hundred kB that glibc keeps for reuse once its mmap threshold has risen; without this, a
    packed SmolLM2 stays ~37 MB above its weights and tokenizer after loading.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear | QuantEmbedding) for m in model.modules())


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights occupy: parameters, packed blocks and fp16-packed matrices, each
    shared tensor (a tied head) once."""
    from scratchlm.generation.packed import PackedLinear

    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = tensor.untyped_storage().data_ptr()
        if key not in seen and tensor.numel():
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    for module in model.modules():
        if isinstance(module, PackedLinear):
            total += module.in_features * module.out_features * 2 + module.out_features * 4
    return total


