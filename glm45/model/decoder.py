"""One decoder block of GLM-4.5 and its attention, shared by the main stack and the MTP layer.

The attention has two modes over the same weights and maths: full causal sequences ([B, T, D], for
training and scoring), or the engine's cached path ([N, D] flattened tokens of many sequences, with an
`AttentionContext` that owns the KV cache).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from glm45.config import ModelConfig
from glm45.model.layers import MLP, Linear, RMSNorm, apply_rotary
from glm45.model.moe import MoE


class AttentionContext(Protocol):
    """What the cached path needs from the engine, for the tokens of one forward step."""

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [N, Hq, hd], k/v [N, Hkv, hd] (RoPE applied) → attention output [N, Hq, hd]."""
        ...


class Attention(nn.Module):
    """Grouped-query attention with q/k/v bias, optional per-head QK-norm and partial RoPE."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        hidden, hd = config.hidden_size, config.head_dim
        self.q_proj = Linear(hidden, self.num_heads * hd, bias=config.attention_bias)
        self.k_proj = Linear(hidden, self.num_kv_heads * hd, bias=config.attention_bias)
        self.v_proj = Linear(hidden, self.num_kv_heads * hd, bias=config.attention_bias)
        self.o_proj = Linear(self.num_heads * hd, hidden, bias=False)
        self.use_qk_norm = config.use_qk_norm
        if self.use_qk_norm:
            # One norm of size head_dim shared by all heads, after the bias and before RoPE.
            self.q_norm = RMSNorm(hd, config.rms_norm_eps)
            self.k_norm = RMSNorm(hd, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: AttentionContext | None = None
    ) -> torch.Tensor:
        leading = x.shape[:-1]
        q = self.q_proj(x).view(*leading, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(*leading, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(*leading, self.num_kv_heads, self.head_dim)
        if self.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        # One rotation for queries and keys together: fewer small ops on the decode path.
        q, k = apply_rotary(torch.cat([q, k], dim=-2), *rope).split([self.num_heads, self.num_kv_heads], dim=-2)
        if ctx is None:  # full causal sequences, [B, T, H, hd] → [B, H, T, hd]
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                is_causal=True, scale=self.scale, enable_gqa=True,
            ).transpose(1, 2)
        else:
            out = ctx.attend(self.layer_idx, q, k, v)
        return self.o_proj(out.reshape(*leading, self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        if config.is_moe_layer(layer_idx):
            self.mlp: nn.Module = MoE(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: AttentionContext | None = None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))
