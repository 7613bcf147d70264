"""Building blocks besides attention: norms and MLPs, chosen by config flags."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.models.config import ModelConfig


class RMSNorm(nn.Module):
    """x / rms(x) · γ, computed in fp32 (as HF Llama does) so low-precision activations stay exact."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:
            # torch's fused kernel: the same numbers as below (forward and gradients, tested), in
            # one op instead of six — a third less time per norm, and decoding runs 2 per layer.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        # (In place on the fresh mean: one op fewer per norm, and decoding runs 2 per layer per token.)
        x32 = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True).add_(self.eps))
        return self.weight * x32.to(dtype)


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or config.n_embd
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.norm_bias)


class GeluMLP(nn.Module):
    """GPT-2's feed-forward: up (d→4d), GELU with the tanh approximation, down (4d→d)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class SwiGLUMLP(nn.Module):
    """Llama's feed-forward: down(silu(gate(x)) · up(x)).

    ``generation.packed`` may replace gate/up_proj by one ``gate_up_proj`` (weights stacked, for
    inference): one matrix product per token instead of two.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.mlp_bias)
        self.gate_up_proj: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def make_mlp(config: ModelConfig) -> nn.Module:
    return SwiGLUMLP(config) if config.mlp == "swiglu" else GeluMLP(config)
