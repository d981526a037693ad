"""Benchmark models: random-weight checkpoints of the GLM-4.5 architecture at chosen sizes.

`air_shaped` is GLM-4.5-Air's shape scaled to about 0.6B parameters (hidden 1024, 12 layers, one dense
layer, 64 experts top-8 plus a shared expert, the real 151,552-token vocabulary), small enough for the
2-core CI machine while keeping Air's proportions: the routed experts dominate the parameters, the head
dominates the bytes read per decoded token.
"""

from __future__ import annotations

from pathlib import Path

import torch

from glm45.config import ModelConfig
from glm45.model import Glm4MoeForCausalLM

SHAPES = {
    "air-0.6b": dict(vocab_size=151552, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=128,
                     num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                     first_k_dense_replace=1, n_routed_experts=64, num_experts_per_tok=8, use_qk_norm=False,
                     routed_scaling_factor=1.0, num_nextn_predict_layers=1, eos_token_id=[151329, 151336, 151338]),
}


def build_random_checkpoint(name: str, folder: Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """Write (once) a random-weight checkpoint of the named shape; returns its folder."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    config = ModelConfig(**SHAPES[name], torch_dtype=str(dtype).removeprefix("torch."))
    torch.manual_seed(seed)
    model = Glm4MoeForCausalLM(config)
    model.init_weights(std=0.02)
    model.to(dtype)
    for module in model.modules():  # keep the router in float32, as the released checkpoints do
        if type(module).__name__ == "Router":
            module.float()
    model.save_pretrained(folder)
    return folder


def active_weight_bytes(config: ModelConfig, bytes_per_param: int) -> int:
    """Bytes of weights one decode step reads: everything but the embedding table (one row) and the
    routed experts that were not chosen (k of E per MoE layer), MTP excluded."""
    h, hd = config.hidden_size, config.head_dim
    attention = h * hd * (config.num_attention_heads * 2 + config.num_key_value_heads * 2)
    dense = 3 * h * config.intermediate_size
    expert = 3 * h * config.moe_intermediate_size
    moe = expert * (config.num_experts_per_tok + config.n_shared_experts) + h * config.n_routed_experts * 2
    layers = config.num_hidden_layers * attention + config.first_k_dense_replace * dense + config.num_moe_layers * moe
    return (layers + config.vocab_size * h) * bytes_per_param


def flops_per_token(config: ModelConfig, context: int = 0, with_head: bool = True) -> int:
    """Matmul FLOPs for one token (2 per multiply-add), attention over `context` earlier tokens included;
    prefill computes the head for the last token only, hence `with_head=False` there."""
    params = active_weight_bytes(config, 1) - (0 if with_head else config.vocab_size * config.hidden_size)
    attention = 4 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * context
    return 2 * params + attention
