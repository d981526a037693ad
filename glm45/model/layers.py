"""Building blocks shared by the decoder and the MTP layer: embeddings, RMSNorm, partial RoPE, the SwiGLU MLP.

Each one reproduces the reference numerics exactly, dtype casts included, because bf16 parity with
transformers depends on where the casts happen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glm45.kernels import cpu, prefill


class Linear(nn.Linear):
    """nn.Linear whose inference path takes the fast bf16 CPU kernels (glm45/kernels/cpu.py) when they apply."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu.linear(x, self.weight, self.bias)


class Embedding(nn.Embedding):
    """nn.Embedding that leaves a table on the meta device uninitialised. The loader builds models on the meta
    device, and `normal_` on a meta tensor runs through torch._refs, whose first use imports torch._dynamo and
    triton (about a second, and 70 MiB resident) to draw values the checkpoint replaces."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class RMSNorm(nn.Module):
    """y = w · (x / rms(x)), normalised in float32, cast back to the input dtype, then scaled."""

    def __init__(self, size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = prefill.rms_norm(x, self.weight, self.eps)  # a bf16 model on CPU at inference: one kernel call
        if fused is not None:
            return fused
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Partial rotate-half (NeoX) RoPE: the first `rotary_dim` dims of each head rotate, dim i pairs with
    dim i + rotary_dim/2; the remaining dims pass through untouched.

    cos/sin are computed in float32 from the positions of the tokens at hand (no static table to outgrow)
    and cast to the activation dtype, as the reference does.
    """

    def __init__(self, rotary_dim: int, theta: float):
        super().__init__()
        self.rotary_dim = rotary_dim
        self.theta = theta

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32, device=device) / self.rotary_dim
        return 1.0 / (self.theta**exponents)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [...] (int) → cos, sin [..., rotary_dim] in `dtype`."""
        freqs = positions.float()[..., None] * self.inv_freq(positions.device)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, H, head_dim]; cos/sin [..., T, rotary_dim] broadcast over heads."""
    rotary_dim = cos.shape[-1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated_half = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    return torch.cat((x_rot * cos + rotated_half * sin, x_pass), dim=-1)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) · up(x)). Used by dense layers and shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
