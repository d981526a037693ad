"""Tiny GLM-4.5-family checkpoints for tests, built with transformers' own config and model classes and
written with `save_pretrained`, so glm45 is always checked against the reference's files and numbers."""

from __future__ import annotations

from pathlib import Path

import torch

ROPE = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
COMMON = dict(
    vocab_size=320, hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
    intermediate_size=128, moe_intermediate_size=32, attention_bias=True, rms_norm_eps=1e-5,
    max_position_embeddings=4096, eos_token_id=[0, 1, 2], pad_token_id=0, rope_parameters=ROPE,
)

# GLM-4.5-like: QK-norm, 3 dense layers first, routed scaling 2.5.
GLM45_LIKE = dict(COMMON, num_hidden_layers=5, first_k_dense_replace=3, use_qk_norm=True,
                  routed_scaling_factor=2.5, n_routed_experts=16, num_experts_per_tok=4)
# Air-like: no QK-norm, 1 dense layer, scaling 1.0.
AIR_LIKE = dict(COMMON, num_hidden_layers=3, first_k_dense_replace=1, use_qk_norm=False,
                routed_scaling_factor=1.0, n_routed_experts=16, num_experts_per_tok=4)
# Grouped routing: the best 2 of 4 groups of experts.
GROUPED = dict(COMMON, num_hidden_layers=3, first_k_dense_replace=1, use_qk_norm=True,
               routed_scaling_factor=2.5, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)

TINY_CONFIGS = {"glm45_like": GLM45_LIKE, "air_like": AIR_LIKE, "grouped": GROUPED}


def build_reference(kind: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised transformers `Glm4MoeForCausalLM` with a non-zero balancing bias, so that
    selection by biased scores and weighting by unbiased scores are both exercised."""
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    torch.manual_seed(seed)
    config = Glm4MoeConfig(**TINY_CONFIGS[kind])
    model = Glm4MoeForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():  # larger than the default init: routing and logits spread out
            if param.dim() >= 2:
                param.normal_(0.0, 0.08)
        for layer in model.model.layers[config.first_k_dense_replace:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.05)
    return model.to(dtype)


def save_reference(kind: str, folder: Path, seed: int = 0) -> Path:
    build_reference(kind, seed).save_pretrained(folder)
    return folder


def save_mtp_model(folder: Path, attention_scale: float = 0.1, seed: int = 0) -> Path:
    """An Air-shaped model with an MTP layer whose drafts the target accepts part of the time.

    The MLPs contribute nothing and attention a little, so the target's next token is mostly a function
    of the current token — which the MTP layer computes exactly from its embedding input (eh_proj passes
    the embedding half through; its block adds only a little attention). Drafts are then accepted often
    but not always, and context (the KV cache) still decides some tokens: every path of verification runs.
    """
    from glm45.config import ModelConfig
    from glm45.model import Glm4MoeForCausalLM

    hf = {k: v for k, v in AIR_LIKE.items() if k != "rope_parameters"}
    config = ModelConfig.from_dict({**hf, "model_type": "glm4_moe", "rope_theta": 10000.0,
                                    "num_nextn_predict_layers": 1})
    torch.manual_seed(seed)
    model = Glm4MoeForCausalLM(config)
    model.init_weights(std=0.08)
    hidden = config.hidden_size
    with torch.no_grad():
        mtp = model.mtp
        for layer in [*model.model.layers, mtp]:
            layer.self_attn.o_proj.weight.mul_(attention_scale)
            mlp = layer.mlp
            if hasattr(mlp, "experts"):
                mlp.experts.down_proj.zero_()
                mlp.shared_experts.down_proj.weight.zero_()
            else:
                mlp.down_proj.weight.zero_()
        mtp.embed_tokens.weight.copy_(model.model.embed_tokens.weight)
        mtp.shared_head.head.weight.copy_(model.lm_head.weight)
        mtp.eh_proj.weight.zero_()
        mtp.eh_proj.weight[:, :hidden] = torch.eye(hidden)
    model.save_pretrained(folder)
    return folder
