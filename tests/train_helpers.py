"""Shared pieces of the training tests: a small GLM-4.5-style tokenizer and a tiny reference checkpoint with it."""

from __future__ import annotations

from pathlib import Path

from glm45_tiny.synthetic import generate
from glm45_tiny.tokenizer_build import build_tokenizer

from glm45.chat import render_chat
from glm45.tokenizer import Tokenizer

TINY_VOCAB = 320  # the tiny reference checkpoints have 320 embeddings


def conversation_texts(num: int = 200, seed: int = 0) -> list[str]:
    return [render_chat(c["messages"], c["tools"], enable_thinking=c["enable_thinking"], add_generation_prompt=False)
            for c in generate(num, seed)]


def make_tokenizer(folder: Path) -> Tokenizer:
    build_tokenizer(conversation_texts(), TINY_VOCAB, folder)
    return Tokenizer.from_pretrained(folder)


def tiny_model_config():
    """A tiny GLM-4.5-like glm45 ModelConfig (1 dense + 2 MoE layers, one MTP layer) for training tests."""
    from glm45.config import ModelConfig

    return ModelConfig(vocab_size=320, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                       num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                       use_qk_norm=True, first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2,
                       routed_scaling_factor=2.5, num_nextn_predict_layers=1, rope_theta=10000.0)
