"""Half-precision weights for decoding on a CPU: half the bytes per token, fp32 arithmetic.

Decoding one token multiplies one vector by every weight matrix, so on a CPU its speed is the
memory bandwidth divided by the bytes of weights: fp32 gpt2-124m reads 0.5 GB per token.  Storing
the weights as fp16 halves that, but a plain ``model.half()`` runs fp16 arithmetic, which CPUs
without native fp16 (most x86) emulate slowly — and so is bf16 without AMX or AVX512-BF16.
FBGEMM's fp16 linear keeps the weights packed in fp16 and converts them to fp32 inside the
matrix kernel (F16C), so it reads half the bytes and computes like fp32: its result equals an fp32
``F.linear`` with the weights rounded to fp16.

``pack_fp16(model)`` swaps every ``nn.Linear`` for a ``PackedLinear``, in place, the LM head
included (tied to the embedding or not: it is a fifth of SmolLM2-135M's weights).  Projections
that read the same input are packed as one matrix: q, k and v (``Attention.qkv_proj``), gate and
up (``SwiGLUMLP.gate_up_proj``), so a layer makes four matrix calls per token instead of seven;
the numbers are those of the separate products.  The result is for inference only: packed
weights have no gradients and are not parameters, so a packed model cannot be trained or saved.
The token embedding stays fp32 (a lookup reads one row per token).

This module is the one place where weights are packed for inference.  The other formats torch
offers kernels for are not offered here (the measurements are in docs/benchmarks.md, "Weight
formats tried for CPU decoding"):

* int8 through FBGEMM (``quantized.linear_dynamic``, per-channel weights): a quarter of the bytes,
  but it quantizes each activation vector to 7 bits with one scale, and Llama activations have
  outliers, so the logits move by several units and greedy answers change: not a lossless mode;
* int4 groups of 32 (``_weight_int4pack_mm_for_cpu``), which could hold Q4_1 weights exactly, and
  ``_weight_int8pack_mm``: their CPU kernels are no faster than fp16 weights, and slower than
  fp32 with fp32 activations.

fp16 weights are read at about the memory bandwidth, so what is left per token is that read and
eager PyTorch's per-op overhead over the thousand or so small ops of a forward pass.
"""

from __future__ import annotations

import torch
from torch import nn

from scratchlm.errors import ConfigError


def fp16_packing_available() -> bool:
    """Whether this torch build has FBGEMM's fp16 linear (x86 builds do)."""
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
        torch.ops.quantized, "linear_prepack_fp16")


class PackedLinear(nn.Module):
    """``y = x Wᵀ + b`` with W held in fp16 by FBGEMM; x and y are fp32."""

    def __init__(self, linear: nn.Linear | None = None, *, weight: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None):
        super().__init__()
        if linear is not None:
            weight, bias = linear.weight, linear.bias
        weight = weight.detach().float().cpu()
        self.out_features, self.in_features = weight.shape
        bias = None if bias is None else bias.detach().float().cpu()
        self.packed = torch.ops.quantized.linear_prepack_fp16(weight, bias)

    @classmethod
    def stacked(cls, linears: list[nn.Linear]) -> PackedLinear:
        """One packed matrix for several projections of the same input: their outputs, concatenated."""
        biases = [lin.bias for lin in linears]
        bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach() if b is not None else torch.zeros(lin.out_features)
             for b, lin in zip(biases, linears, strict=True)])
        return cls(weight=torch.cat([lin.weight.detach() for lin in linears]), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=fp16 (packed)"


def pack_fp16(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` of a CPU model by a ``PackedLinear``, in place; returns the model.

    q/k/v and gate/up projections become one stacked ``PackedLinear`` each (see the module docstring).
    LoRA adapters are merged into their weights first (``finetune.lora.merge_lora``).
    """
    from scratchlm.finetune.lora import merge_lora
    from scratchlm.models.attention import Attention
    from scratchlm.models.layers import SwiGLUMLP

    if not fp16_packing_available():
        raise ConfigError("fp16 weights on the CPU need FBGEMM, which this torch build lacks",
                          "use float32 on this machine")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ConfigError("fp16 packing is for CPU models", "on a GPU, use the model's .half() instead")
    merge_lora(model)
    for module in list(model.modules()):
        if isinstance(module, Attention) and module.qkv_proj is None:
            module.qkv_proj = PackedLinear.stacked([module.q_proj, module.k_proj, module.v_proj])
            module.q_proj = module.k_proj = module.v_proj = None
        elif isinstance(module, SwiGLUMLP) and module.gate_up_proj is None:
            module.gate_up_proj = PackedLinear.stacked([module.gate_proj, module.up_proj])
            module.gate_proj = module.up_proj = None
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child))
    return model.eval()


def is_packed(model: nn.Module) -> bool:
    return any(isinstance(m, PackedLinear) for m in model.modules())
