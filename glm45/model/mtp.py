"""The MTP (multi-token prediction) layer: GLM-4.5's own draft model for speculative decoding.

Stored in checkpoints as `model.layers.{num_hidden_layers}`: a full MoE decoder block plus
`enorm`, `hnorm`, `eh_proj [D, 2D]`, `shared_head.{norm,head}` and its own `embed_tokens`.
One draft step, for the pair (h_t, x_{t+1}) at position t:

    x   = eh_proj(cat([enorm(embed(x_{t+1})), hnorm(h_t)], -1))      # embedding first
    x   = decoder_block(x)                                            # own KV cache (layer index N)
    h'  = shared_head.norm(x)                                         # carried as h for the next step
    logits(x_{t+2}) = shared_head.head(h')

`h_t` is the target model's final hidden state (after `model.norm`). Further draft steps carry the
*normalised* output h' — carrying the un-normalised one collapses acceptance after the first token.
"""

from __future__ import annotations

import torch
from torch import nn

from glm45.config import ModelConfig
from glm45.model.decoder import AttentionContext, DecoderLayer
from glm45.model.layers import Embedding, Linear, RMSNorm


class SharedHead(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head = Linear(config.hidden_size, config.vocab_size, bias=False)


class MTPLayer(DecoderLayer):
    """A decoder block (always MoE, like the released checkpoints) with the MTP input and output parts."""

    def __init__(self, config: ModelConfig):
        # The MTP block sits after the last layer, so it is an MoE block whenever the model has any.
        super().__init__(config, layer_idx=config.num_hidden_layers)
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = SharedHead(config)

    def forward(
        self,
        next_token_ids: torch.Tensor,
        hidden: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        ctx: AttentionContext | None = None,
    ) -> torch.Tensor:
        """(x_{t+1} ids [...], h_t [..., D]) → the normalised h' [..., D]. The head is applied separately
        (`shared_head.head`), only at the rows whose logits are needed."""
        embedded = self.enorm(self.embed_tokens(next_token_ids))
        x = self.eh_proj(torch.cat([embedded, self.hnorm(hidden)], dim=-1))
        x = super().forward(x, rope, ctx)
        return self.shared_head.norm(x)
