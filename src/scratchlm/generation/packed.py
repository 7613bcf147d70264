"""Half-precision weights for decoding on a CPU: half the bytes per token, fp32 arithmetic.

Decoding one token multiplies one vector by every weight matrix, so on a CPU its speed is the
memory bandwidth divided by the bytes of weights: fp32 gpt2-124m reads 0.5 GB per token.  Storing
the weights as fp16 halves that, but a plain ``model.half()`` runs fp16 arithmetic, which CPUs
without native fp16 (most x86) emulate slowly — and so is bf16 without AMX or AVX512-BF16.
FBGEMM's fp16 linear keeps the weights packed in fp16 and converts them to fp32 inside the
matrix kernel (F16C), so it reads half the bytes and computes like fp32: its result equals an fp32
``F.linear`` with the weights rounded to fp16.

``pack_fp16(model)`` swaps every ``nn.Linear`` for a ``PackedLinear``, in place.  The result is
for inference only: packed weights have no gradients and are not parameters, so a packed model
cannot be trained or saved.  The token embedding stays fp32 (a lookup reads one row per token).
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

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        bias = None if linear.bias is None else linear.bias.detach().float().cpu()
        self.packed = torch.ops.quantized.linear_prepack_fp16(linear.weight.detach().float().cpu(), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=fp16 (packed)"


def pack_fp16(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` of a CPU model by a ``PackedLinear``, in place; returns the model."""
    if not fp16_packing_available():
        raise ConfigError("fp16 weights on the CPU need FBGEMM, which this torch build lacks",
                          "use float32 on this machine")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ConfigError("fp16 packing is for CPU models", "on a GPU, use the model's .half() instead")
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child))
    return model.eval()


def is_packed(model: nn.Module) -> bool:
    return any(isinstance(m, PackedLinear) for m in model.modules())
