"""Bytes of a model's parts per GPU under glm45's tensor parallelism: weights by format, KV per token,
activations of one step."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from glm45.config import ModelConfig
from glm45.plan.formats import WeightFormat


@dataclass(frozen=True)
class WeightBytes:
    """Weight bytes by part of the model. Norms and biases go with their block's part; routers with the
    routed experts; the final norm with the embeddings; everything in `model.layers.{N}` to the MTP layer."""

    attention: int = 0
    dense_mlp: int = 0
    routed_experts: int = 0
    shared_experts: int = 0
    embeddings: int = 0  # embed_tokens, lm_head, the final norm
    mtp: int = 0         # the MTP layer, with its own embedding and head

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    def scaled(self, ratios: dict[str, float] | None) -> WeightBytes:
        """Each part times its ratio (e.g. stored / computed bytes); None leaves the bytes as they are."""
        if ratios is None:
            return self
        return WeightBytes(**{f.name: round(getattr(self, f.name) * ratios[f.name]) for f in fields(self)})


LABELS = {"attention": "attention", "dense_mlp": "dense MLP", "routed_experts": "routed experts",
          "shared_experts": "shared experts", "embeddings": "embeddings + head", "mtp": "MTP layer"}


@dataclass(frozen=True)
class _Tensor:
    part: str
    kind: str  # linear (the weight format) | lm_head, head (HEADS_PACKED_IN) | dense (bf16) | router (fp32)
    name: str
    rows: int
    cols: int = 1
    count: int = 1


# The LM heads and MTP's eh_proj are linear layers the FP8 releases ship in bf16 (and an FP8 checkpoint keeps them
# so); glm45's int8 and int4 pack them like every other linear layer (glm45.quant.scheme).
HEADS_PACKED_IN = ("int8", "int4")


def kv_heads_per_rank(config: ModelConfig, tp: int) -> int:
    return config.num_key_value_heads // tp if config.num_key_value_heads >= tp else 1


def _block(config: ModelConfig, tp: int, part: str | None, moe: bool, prefix: str) -> list[_Tensor]:
    """One decoder block's tensors as this rank holds them; `part` forces every tensor into one part (MTP)."""
    D, hd, q = config.hidden_size, config.head_dim, config.num_attention_heads * config.head_dim // tp
    kv = kv_heads_per_rank(config, tp) * hd
    attn = part or "attention"
    out = [_Tensor(attn, "linear", f"{prefix}.self_attn.q_proj", q, D),
           _Tensor(attn, "linear", f"{prefix}.self_attn.k_proj", kv, D, 2),  # k and v
           _Tensor(attn, "linear", f"{prefix}.self_attn.o_proj", D, q),
           _Tensor(attn, "dense", "input_layernorm", D)]
    if config.attention_bias:
        out.append(_Tensor(attn, "dense", "qkv bias", q + 2 * kv))
    if config.use_qk_norm:
        out.append(_Tensor(attn, "dense", "q/k norm", hd, 1, 2))
    if not moe:
        mlp, inter = part or "dense_mlp", config.intermediate_size // tp
        return out + [_Tensor(mlp, "linear", f"{prefix}.mlp.gate_proj", inter, D, 2),  # gate and up
                      _Tensor(mlp, "linear", f"{prefix}.mlp.down_proj", D, inter),
                      _Tensor(mlp, "dense", "post_attention_layernorm", D)]
    routed, shared, E = part or "routed_experts", part or "shared_experts", config.n_routed_experts
    inter = config.moe_intermediate_size // tp
    out += [_Tensor(routed, "linear", f"{prefix}.mlp.experts.gate_proj", inter, D, 2 * E),
            _Tensor(routed, "linear", f"{prefix}.mlp.experts.down_proj", D, inter, E),
            _Tensor(routed, "router", "router", E, D + 1),  # weight [E, D] and e_score_correction_bias [E]
            _Tensor(routed, "dense", "post_attention_layernorm", D)]
    if config.n_shared_experts:
        inter = config.moe_intermediate_size * config.n_shared_experts // tp
        out += [_Tensor(shared, "linear", f"{prefix}.mlp.shared_experts.gate_proj", inter, D, 2),
                _Tensor(shared, "linear", f"{prefix}.mlp.shared_experts.down_proj", D, inter)]
    return out


def _tensors(config: ModelConfig, tp: int) -> list[_Tensor]:
    D, vocab_rows = config.hidden_size, math.ceil(config.vocab_size / tp)  # padded vocabulary shard
    out: list[_Tensor] = []
    dense, moe = config.first_k_dense_replace, config.num_moe_layers
    if dense:
        out += [replace(t, count=t.count * dense) for t in _block(config, tp, None, False, "model.layers.*")]
    if moe:
        out += [replace(t, count=t.count * moe) for t in _block(config, tp, None, True, "model.layers.*")]
    out += [_Tensor("embeddings", "dense", "embed_tokens", vocab_rows, D),
            _Tensor("embeddings", "dense", "norm", D)]
    if not config.tie_word_embeddings:
        out.append(_Tensor("embeddings", "lm_head", "lm_head", vocab_rows, D))
    if config.num_nextn_predict_layers:
        n = config.num_hidden_layers
        out += _block(config, tp, "mtp", config.is_moe_layer(n), f"model.layers.{n}")
        out += [_Tensor("mtp", "dense", "embed_tokens", vocab_rows, D),
                _Tensor("mtp", "lm_head", f"model.layers.{n}.shared_head.head", vocab_rows, D),
                _Tensor("mtp", "head", f"model.layers.{n}.eh_proj", D, 2 * D),
                _Tensor("mtp", "dense", "enorm, hnorm, shared_head.norm", D, 1, 3)]
    return out


def weight_bytes(config: ModelConfig, fmt: WeightFormat, tp: int = 1, head: WeightFormat | None = None) -> WeightBytes:
    """The weights' bytes on one of `tp` ranks (tp=1: the whole model), computed from the shapes; `head` is the LM
    heads' format when they have one of their own (`--lm-head-quantization`)."""
    dense_bytes = fmt.bits // 8 if fmt.bits > 16 else 2  # unquantized tensors: bf16 (fp32 for an fp32 model)
    parts = dict.fromkeys(LABELS, 0)
    for t in _tensors(config, tp):
        if (stored_in := _format_of(t, fmt, head)) is not None:
            size = stored_in.nbytes(t.rows, t.cols)
        else:
            size = t.rows * t.cols * (4 if t.kind == "router" else dense_bytes)
        parts[t.part] += size * t.count
    return WeightBytes(**parts)


def block_problems(config: ModelConfig, fmt: WeightFormat, tp: int, head: WeightFormat | None = None) -> list[str]:
    """The linear layers whose per-rank input dimension their format's blocks do not divide."""
    return [f"{t.name}: {problem}" for t in _tensors(config, tp)
            if (stored_in := _format_of(t, fmt, head)) is not None and (problem := stored_in.block_problem(t.cols))]


def _format_of(t: _Tensor, fmt: WeightFormat, head: WeightFormat | None) -> WeightFormat | None:
    """The format tensor `t` is stored in; None: unquantized (bf16, or fp32 for a router)."""
    if t.kind == "lm_head" and head is not None:
        return head
    if t.kind == "linear" or (t.kind in ("head", "lm_head") and fmt.name in HEADS_PACKED_IN):
        return fmt
    return None


def kv_bytes_per_token(config: ModelConfig, kv_bytes: int, tp: int = 1, mtp: bool = False) -> int:
    """K and V of one token on one of `tp` ranks: 2 × layers × KV heads × head_dim × bytes."""
    layers = config.num_hidden_layers + (1 if mtp else 0)
    return 2 * layers * kv_heads_per_rank(config, tp) * config.head_dim * kv_bytes


def activation_bytes(config: ModelConfig, tp: int, max_num_batched_tokens: int, max_num_seqs: int,
                     num_speculative_tokens: int) -> int:
    """One step's live activations on one rank (the formula in the module docstring)."""
    D, hd, k, S = config.hidden_size, config.head_dim, num_speculative_tokens, max_num_seqs
    tokens = max(max_num_batched_tokens, S * (k + 1))
    heads = config.num_attention_heads // tp + kv_heads_per_rank(config, tp)
    moe_width = (config.num_experts_per_tok + config.n_shared_experts) * config.moe_intermediate_size
    ffn = max(config.intermediate_size if config.first_k_dense_replace else 0, moe_width) // tp
    # residual, normed input, block output; q, k, v and attention output; gate, up, activated; router logits
    per_token = 3 * D + 2 * heads * hd + 3 * ffn + 2 * config.n_routed_experts
    logits = S * (k + 1) * config.vocab_size * 4 * 2
    return tokens * per_token * 2 + logits
