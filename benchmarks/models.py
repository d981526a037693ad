"""Benchmark models: random-weight checkpoints of the GLM-4.5 architecture at chosen sizes.

`small` (71.5M parameters) is GLM-4.5's own flavour (QK-norm, routed scaling 2.5) at a size where per-step
overheads show: 8 layers (1 dense), 16 routed experts top-4 plus a shared one, hidden 512, 4 query heads
and 2 KV heads of 128 (half rotary), dense FFN 1024, expert FFN 256, a 16,384-token vocabulary, no MTP
layer. Every matrix's input width is a multiple of 256, so llama.cpp's K-quants apply to all of them.
Parameters: embedding and head 2 × 8.4M, attention 8 × 0.79M, the dense FFN 1.6M, 7 MoE layers × 6.7M.
The GLM-4.5 special tokens take the last 36 ids (16348–16383), so its end-of-sequence ids are
16348/16355/16357 (`<|endoftext|>`, `<|user|>`, `<|observation|>`), as 151329/151336/151338 are in GLM-4.5.

`air-0.6b` is GLM-4.5-Air's shape scaled to about 0.6B parameters (hidden 1024, 12 layers, one dense
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
    "small": dict(vocab_size=16384, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
                  num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                  first_k_dense_replace=1, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1,
                  use_qk_norm=True, routed_scaling_factor=2.5, num_nextn_predict_layers=0,
                  eos_token_id=[16348, 16355, 16357]),
    "air-0.6b": dict(vocab_size=151552, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=128,
                     num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                     first_k_dense_replace=1, n_routed_experts=64, num_experts_per_tok=8, use_qk_norm=False,
                     routed_scaling_factor=1.0, num_nextn_predict_layers=1, eos_token_id=[151329, 151336, 151338]),
}


def build_random_checkpoint(name: str, folder: Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                            perturb: bool = False) -> Path:
    """Write (once) a random-weight checkpoint of the named shape; returns its folder. With `perturb`, the
    norms, biases and routers' correction biases are random too (`init_weights` makes them 1 and 0), so that
    comparing engines on the checkpoint also checks that each one reads them."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    config = ModelConfig(**SHAPES[name], torch_dtype=str(dtype).removeprefix("torch."))
    torch.manual_seed(seed)
    model = Glm4MoeForCausalLM(config)
    model.init_weights(std=0.02)
    if perturb:
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if param_name.endswith("norm.weight"):
                    param.add_(torch.randn_like(param), alpha=0.1)
                elif param_name.endswith(".bias"):
                    param.normal_(0.0, 0.02)
            for buffer_name, buffer in model.named_buffers():
                if buffer_name.endswith("e_score_correction_bias"):
                    buffer.normal_(0.0, 0.05)
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


# Bytes per weight of each benchmark precision, scales included, for the bandwidth floor: fp8 is e4m3 with one
# scale per output row (negligible); int8 is blocks of 32 with a 16-bit scale (Q8_0: 34 bytes per 32 weights);
# int4 is glm45's layout: blocks of 32 with 8-bit codes of a scale and a minimum under an fp16 pair per 8 blocks,
# 4.625 bits a weight (llama.cpp's rows are counted from their GGUF's own tensor types).
BYTES_PER_WEIGHT = {"bf16": 2.0, "fp8": 1.0, "int8": 34 / 32, "int4": 148 / 256, "none": 2.0}


def split_precision(precision: str) -> tuple[str, str | None]:
    """A benchmark precision `W` or `W:H` (weights in W, the LM heads in H: `--lm-head-quantization H`)."""
    weights, _, head = precision.partition(":")
    return weights, head or None


def decode_bytes_per_token(config: ModelConfig, bytes_per_weight: float, context: int = 0,
                           head_bytes_per_weight: float | None = None) -> float:
    """Bytes one batch-1 decode step reads: every matrix of every layer at `bytes_per_weight` except the routed
    experts not chosen (k of E per MoE layer), the LM head likewise (or at `head_bytes_per_weight`), the routers
    and their correction biases in float32, norms, biases and one embedding row in bf16, and the bf16 K/V of
    `context` earlier tokens. MTP excluded."""
    h, hd = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    attention = 2 * h * q + 2 * h * kv
    small = (q + 2 * kv + 2 * h) + (2 * hd if config.use_qk_norm else 0)  # biases and norms, bf16
    dense = 3 * h * config.intermediate_size
    experts = 3 * h * config.moe_intermediate_size * (config.num_experts_per_tok + config.n_shared_experts)
    matrices = (config.num_hidden_layers * attention + config.first_k_dense_replace * dense
                + config.num_moe_layers * experts)
    head = config.vocab_size * h * (bytes_per_weight if head_bytes_per_weight is None else head_bytes_per_weight)
    routers = config.num_moe_layers * (h + 1) * config.n_routed_experts * 4
    kv_cache = config.num_hidden_layers * 2 * kv * 2 * context
    bf16_small = 2 * (config.num_hidden_layers * small + h + h)  # + the final norm and one embedding row
    return matrices * bytes_per_weight + head + routers + bf16_small + kv_cache
