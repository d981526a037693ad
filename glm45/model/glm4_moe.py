"""The GLM-4.5 architecture (`Glm4MoeForCausalLM`), single device, readable top to bottom.

embed → N × [RMSNorm → attention → residual → RMSNorm → (dense SwiGLU | MoE) → residual] → RMSNorm → head,
plus the optional MTP layer (`mtp.py`) that drafts one more token from the final hidden state.

Two ways to run the same weights and maths:
- full sequence: `model(input_ids [B, T])` → logits [B, T, V], causal attention over the batch rows
  (training, parity tests, one-shot scoring);
- cached: the engine flattens the tokens of many sequences into `input_ids [N]` with their `positions [N]`
  and passes an `AttentionContext` whose `attend` writes this step's K/V into its cache and attends over
  each sequence's past. The model knows nothing of paging; the context knows nothing of the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from glm45.config import ModelConfig
from glm45.model.decoder import AttentionContext, DecoderLayer
from glm45.model.layers import Embedding, Linear, RMSNorm, RotaryEmbedding
from glm45.model.loader import load_model, save_model
from glm45.model.mtp import MTPLayer
from glm45.model.shard import ShardPlan


class Glm4MoeModel(nn.Module):
    """The decoder stack: embeddings, layers and the final norm (checkpoint prefix `model.`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Glm4MoeForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, with_mtp: bool | None = None):
        super().__init__()
        self.config = config
        self.model = Glm4MoeModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config.rotary_dim, config.rope_theta)
        if with_mtp is None:
            with_mtp = config.num_nextn_predict_layers > 0
        self.mtp: MTPLayer | None = MTPLayer(config) if with_mtp else None

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random initialisation for training from scratch and benchmarks: normal(0, std) matrices,
        unit norms, zero biases and zero balancing bias."""
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, std, generator=generator)
        for name, buffer in self.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.zero_()

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (the final norm's: norms are never quantized)."""
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary(positions, dtype)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        ctx: AttentionContext | None = None,
    ) -> torch.Tensor:
        """Final normalised hidden states, [B, T, D] for [B, T] input or [N, D] for the cached path."""
        if positions is None:
            if ctx is not None:
                raise ValueError("the cached path needs the tokens' positions")
            positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
        x = self.model.embed_tokens(input_ids)
        rope = self.rope(positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, rope, ctx)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def mtp_draft(
        self,
        next_token_ids: torch.Tensor,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        ctx: AttentionContext | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One MTP step for pairs (h_t, x_{t+1}) at positions t → (normalised h', logits for x_{t+2})."""
        h_next = self.mtp_hidden_states(next_token_ids, hidden, positions, ctx)
        return h_next, self.compute_mtp_logits(h_next)

    def mtp_hidden_states(
        self,
        next_token_ids: torch.Tensor,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        ctx: AttentionContext | None = None,
    ) -> torch.Tensor:
        """The one MTP forward: the step's normalised h' (engine drafting and the training loss both use it);
        `compute_mtp_logits` turns the rows that are needed into logits."""
        if self.mtp is None:
            raise ValueError("this model has no MTP layer (the checkpoint has no model.layers.{N}.* tensors)")
        return self.mtp(next_token_ids, hidden, self.rope(positions, hidden.dtype), ctx)

    def compute_mtp_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.mtp.shared_head.head(h)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        ctx: AttentionContext | None = None,
    ) -> torch.Tensor:
        if ctx is None and input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a [batch, seq] LongTensor, got shape {tuple(input_ids.shape)}")
        return self.compute_logits(self.hidden_states(input_ids, positions, ctx))

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str = "cpu",
        load_mtp: bool = True,
        progress: bool = True,
        parallelize: Callable[[nn.Module], ShardPlan] | None = None,
        quantization: str | None = None,
        share_mtp_copies: bool = False,
        lm_head_quantization: str | None = None,
    ) -> Glm4MoeForCausalLM:
        """Load an HF-layout folder (BF16/FP32/FP8/glm45-quantized, one file or sharded, per-expert or fused
        experts).

        `parallelize(meta_model)` (glm45.parallel) cuts the model to one rank's shard before loading; each
        parameter it cut is then read shard by shard. `quantization` (fp8, int8, int4, or none) keeps weights
        packed in that format (default: the checkpoint's own; none dequantizes), see glm45.quant.scheme;
        `lm_head_quantization` gives the LM heads a format of their own (none: the compute dtype).
        `share_mtp_copies`: the MTP layer uses the main model's embedding and head when the checkpoint's copies
        are identical (serving; training keeps them apart), see glm45.model.loader."""
        return load_model(cls, path, dtype=dtype, device=device, load_mtp=load_mtp, progress=progress,
                          parallelize=parallelize, quantization=quantization, share_mtp_copies=share_mtp_copies,
                          lm_head_quantization=lm_head_quantization)

    def save_pretrained(self, path: str | Path, max_shard_bytes: int = 4 << 30) -> None:
        """Write an HF-layout folder (config, safetensors with per-expert names and the MTP layer)."""
        save_model(self, path, max_shard_bytes=max_shard_bytes)
