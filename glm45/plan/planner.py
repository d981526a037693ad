"""The plan: weights + KV + reserve per GPU for each tensor-parallel size, the smallest that fits, its
report, and the `glm45 plan` command."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, replace
from typing import Any

from glm45.config import ModelConfig
from glm45.plan.accounting import (
    HEADS_PACKED_IN,
    LABELS,
    WeightBytes,
    activation_bytes,
    block_problems,
    kv_bytes_per_token,
    weight_bytes,
)
from glm45.plan.formats import (
    BLOCK_SIZE,
    GPUS,
    KV_CACHE_DTYPES,
    QUANTIZATIONS,
    RESERVE_FRACTION,
    TP_SIZES,
    WEIGHT_FORMATS,
    GiB,
    GpuSpec,
    WeightFormat,
)
from glm45.plan.sources import index_bytes, load_model_source, stored_bytes
from glm45.quant.scheme import checkpoint_format, served_head_format, stored_head_format


@dataclass(frozen=True)
class GpuFit:
    """One GPU's share at `tensor_parallel_size` ranks (the smallest that fits; None when no size fits,
    and then the numbers are for the largest size tried)."""

    gpu: GpuSpec
    tensor_parallel_size: int | None
    weights: int
    kv_cache: int
    activations: int
    reserve: int  # max(RESERVE_FRACTION of the GPU, activations)
    budget: int   # gpu_memory_utilization × the GPU's memory

    @property
    def used(self) -> int:
        return self.weights + self.kv_cache + self.reserve

    @property
    def fits(self) -> bool:
        return self.used <= self.budget


@dataclass(frozen=True)
class MemoryPlan:
    model: str
    source: str
    config: ModelConfig
    quantization: str         # the weight format (a WEIGHT_FORMATS key)
    lm_head_quantization: str | None  # the LM heads' own format (a WEIGHT_FORMATS key); None: as the weights' rule
    kv_cache_dtype: str
    kv_bytes: int             # per element
    max_model_len: int
    max_num_seqs: int
    num_speculative_tokens: int
    max_num_batched_tokens: int
    gpu_memory_utilization: float
    weights: WeightBytes      # the whole model in this format, MTP layer included
    stored: WeightBytes | None  # what the checkpoint's files hold, when read
    kv_tokens: int
    tp_sizes: tuple[int, ...]  # the sizes tried: powers of two that split this model (or the one asked for)
    gpus: tuple[GpuFit, ...]

    @property
    def mtp_on(self) -> bool:
        return self.num_speculative_tokens > 0

    @property
    def resident_weights(self) -> int:
        """The weights the engine loads: the MTP layer only when speculative decoding is on."""
        return self.weights.total - (0 if self.mtp_on else self.weights.mtp)

    @property
    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.config, self.kv_bytes, 1, self.mtp_on)

    def fit(self, gpu: str) -> GpuFit:
        for f in self.gpus:
            if f.gpu.name == gpu:
                return f
        raise ValueError(f"no plan for GPU {gpu!r}; planned: {', '.join(f.gpu.name for f in self.gpus)}")


def resolve_quantization(config: ModelConfig, quantization: str) -> str:
    """The weight format for `--quantization` on this checkpoint; ValueError when unknown or contradicted."""
    q = (quantization or "auto").lower()
    if q not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; supported: {', '.join(QUANTIZATIONS)}")
    stored = checkpoint_format(config)
    if q == "auto":
        return stored
    if stored in ("int8", "int4") and q != stored:
        raise ValueError(f"--quantization {q} contradicts the checkpoint, which is stored in {stored}; "
                         f"an {stored} checkpoint is served as {stored} (use --quantization auto)")
    return "fp8_block" if q == "fp8" and stored == "fp8_block" else q


def resolve_head_quantization(config: ModelConfig, weight_format: str, requested: str | None) -> str | None:
    """The LM heads' format for `--lm-head-quantization` (a WEIGHT_FORMATS key) when they have one of their own;
    None: they follow the weights' rule (HEADS_PACKED_IN). ValueError as the engine would raise it."""
    stored = stored_head_format(config)
    if requested is None and stored in (None, (config.quantization_config or {}).get("quant_method")):
        return None
    quantized = WEIGHT_FORMATS[weight_format].quantized
    engine_format = None if not quantized else "fp8" if weight_format.startswith("fp8") else weight_format
    return served_head_format(requested, engine_format, config) or "bf16"


def resolve_kv_cache_dtype(kv_cache_dtype: str, weight_format: str) -> tuple[str, int]:
    """(name, bytes per element): `auto` is the model's dtype (bf16; fp32 for an fp32 model)."""
    kv = (kv_cache_dtype or "auto").lower()
    if kv == "auto":
        return ("fp32", 4) if weight_format == "fp32" else ("bf16", 2)
    if kv not in KV_CACHE_DTYPES:
        raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r}; supported: auto, {', '.join(KV_CACHE_DTYPES)}")
    return kv, KV_CACHE_DTYPES[kv]


def _tp_sizes(config: ModelConfig, fmt: WeightFormat, tensor_parallel_size: int | None,
              head: WeightFormat | None) -> tuple[int, ...]:
    from glm45.parallel.tensor_parallel import allowed_sizes, unsplittable_fields

    if tensor_parallel_size is not None:
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be ≥ 1, got {tensor_parallel_size}")
        problems = unsplittable_fields(config, tensor_parallel_size, False) or block_problems(
            config, fmt, tensor_parallel_size, head)
        if problems:
            raise ValueError(f"tensor_parallel_size={tensor_parallel_size} does not evenly split "
                             f"{', '.join(problems)} of this model; allowed: {allowed_sizes(config, False)}")
        return (tensor_parallel_size,)
    sizes = tuple(n for n in allowed_sizes(config, False, limit=max(TP_SIZES))
                  if n in TP_SIZES and not block_problems(config, fmt, n, head))
    if not sizes:
        raise ValueError(f"no tensor-parallel size splits this model in {fmt.name}: "
                         f"{'; '.join(block_problems(config, fmt, 1, head))}")
    return sizes


def plan_memory(config: ModelConfig, *, quantization: str = "auto", kv_cache_dtype: str = "auto",
                max_model_len: int | None = None, max_num_seqs: int = 1, num_speculative_tokens: int = 0,
                max_num_batched_tokens: int = 2048, gpu_memory_utilization: float = 0.9,
                gpus: list[GpuSpec] | None = None, tensor_parallel_size: int | None = None,
                stored: WeightBytes | None = None, model: str = "", source: str = "",
                lm_head_quantization: str | None = None) -> MemoryPlan:
    """The memory accounting of `config` served with these settings (vLLM's names), per GPU kind.

    `stored`: the checkpoint's bytes by part (stored_bytes); when the checkpoint is served in its own
    format, every rank's share is scaled by stored / computed bytes, part by part, so the plan counts what
    the files really hold. `tensor_parallel_size`: plan that size only, instead of the smallest that fits."""
    fmt_name = resolve_quantization(config, quantization)
    fmt = WEIGHT_FORMATS[fmt_name]
    head_name = resolve_head_quantization(config, fmt_name, lm_head_quantization)
    head = WEIGHT_FORMATS[head_name] if head_name else None
    kv_name, kv_bytes = resolve_kv_cache_dtype(kv_cache_dtype, fmt_name)
    max_model_len = config.max_position_embeddings if max_model_len is None else max_model_len
    k = num_speculative_tokens
    for name, value in (("max_model_len", max_model_len), ("max_num_seqs", max_num_seqs),
                        ("max_num_batched_tokens", max_num_batched_tokens)):
        if value < 1:
            raise ValueError(f"{name} must be ≥ 1, got {value}")
    if max_model_len > config.max_position_embeddings:
        raise ValueError(f"max_model_len={max_model_len} exceeds the model's context length "
                         f"({config.max_position_embeddings}, max_position_embeddings)")
    if not 0 <= k <= 8:
        raise ValueError(f"speculative_num_steps must be in [0, 8], got {k}")
    if k and (not config.num_nextn_predict_layers or (stored is not None and not stored.mtp)):
        raise ValueError(f"speculative_num_steps={k} needs the model's MTP layer, and {model or 'it'} has none")
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    if (problems := block_problems(config, fmt, 1, head)):
        raise ValueError(f"{fmt.name} cannot store this model: {'; '.join(problems)}")

    computed = weight_bytes(config, fmt, head=head)
    ratios = None
    if stored is not None and fmt_name == checkpoint_format(config):
        ratios = {p: getattr(stored, p) / getattr(computed, p) if getattr(computed, p) else 0.0 for p in LABELS}
    # Every sequence at full length at once, in whole blocks, with room for its k draft tokens.
    kv_tokens = max_num_seqs * math.ceil((max_model_len + k) / BLOCK_SIZE) * BLOCK_SIZE
    kv_layers = config.num_hidden_layers + (1 if k else 0)
    kv_scales = 2 * kv_layers * 4 if kv_bytes == 1 else 0  # one fp32 scale per layer for K and for V

    def share(gpu: GpuSpec, tp: int) -> GpuFit:
        w = weight_bytes(config, fmt, tp, head).scaled(ratios)
        weights = w.total - (0 if k else w.mtp)
        kv = kv_tokens * kv_bytes_per_token(config, kv_bytes, tp, bool(k)) + kv_scales
        act = activation_bytes(config, tp, max_num_batched_tokens, max_num_seqs, k)
        reserve = max(int(RESERVE_FRACTION * gpu.memory_bytes), act)
        return GpuFit(gpu, tp, weights, kv, act, reserve, int(gpu_memory_utilization * gpu.memory_bytes))

    sizes = _tp_sizes(config, fmt, tensor_parallel_size, head)
    fits = []
    for gpu in gpus or list(GPUS.values()):
        tried = [share(gpu, tp) for tp in sizes]
        fits.append(next((f for f in tried if f.fits), replace(tried[-1], tensor_parallel_size=None)))
    return MemoryPlan(model, source, config, fmt_name, head_name, kv_name, kv_bytes, max_model_len, max_num_seqs, k,
                      max_num_batched_tokens, gpu_memory_utilization, computed.scaled(ratios), stored,
                      kv_tokens, sizes, tuple(fits))


def plan_model(model: str, **settings: Any) -> MemoryPlan:
    """`plan_memory` for a known model's name, a checkpoint folder or a config.json (see load_model_source)."""
    config, source, folder = load_model_source(model)
    stored = None
    if folder is not None:
        stored = stored_bytes(folder, config)
        if stored is None:
            stored = index_bytes(folder, config, weight_bytes(config, WEIGHT_FORMATS[checkpoint_format(config)]))
        if stored is not None:
            source += " and its safetensors " + ("headers" if any(folder.glob("*.safetensors")) else "index")
    return plan_memory(config, stored=stored, model=model, source=source, **settings)


def _gib(n: float) -> str:
    """Bytes in GiB (MiB below one GiB, so that small models do not read 0.00)."""
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.2f} MiB"


def describe(plan: MemoryPlan) -> str:
    """The plan as text: what `glm45 plan` prints and what the engine logs at startup."""
    c, k, fmt = plan.config, plan.num_speculative_tokens, WEIGHT_FORMATS[plan.quantization]
    high = "" if not fmt.quantized else "; the heads packed too, embeddings, norms and biases bf16, routers fp32" \
        if fmt.name in HEADS_PACKED_IN else "; embeddings, heads, norms and biases bf16, routers fp32"
    if plan.lm_head_quantization:
        high += f"; the LM heads in {plan.lm_head_quantization} instead"
    lines = [f"{plan.model or 'model'}: {plan.source}" if plan.source else plan.model or "model",
             f"  {c.num_hidden_layers} layers ({c.first_k_dense_replace} dense), hidden {c.hidden_size}, "
             f"{c.num_attention_heads}/{c.num_key_value_heads} heads × {c.head_dim}, {c.n_routed_experts} experts "
             f"(top-{c.num_experts_per_tok}) + {c.n_shared_experts} shared, vocabulary {c.vocab_size}, "
             f"MTP layers {c.num_nextn_predict_layers}",
             f"weights: {fmt.name} ({fmt.note}{high})"]
    for part, label in LABELS.items():
        size = getattr(plan.weights, part)
        stored = f"   stored: {_gib(getattr(plan.stored, part))}" if plan.stored else ""
        note = "   (not loaded: speculative decoding is off)" if part == "mtp" and not k and size else ""
        lines.append(f"  {label:<18} {_gib(size):>12}{stored}{note}")
    lines.append(f"  {'total loaded':<18} {_gib(plan.resident_weights):>12}   "
                 f"({plan.resident_weights / 1e9:.1f} GB)")

    per_layer = 2 * c.num_key_value_heads * c.head_dim * plan.kv_bytes
    mtp_kv = f" + {per_layer:,} for the MTP layer" if k else ""
    seqs = f"{plan.max_num_seqs} sequence{'s' if plan.max_num_seqs > 1 else ''}"
    lines += [f"KV cache: {plan.kv_cache_dtype}, {plan.kv_bytes_per_token:,} bytes per token "
              f"(2 × {c.num_hidden_layers} layers × {c.num_key_value_heads} KV heads × {c.head_dim} × "
              f"{plan.kv_bytes} B{mtp_kv})",
              f"  {seqs} × {plan.max_model_len:,} tokens ({plan.kv_tokens:,} in {BLOCK_SIZE}-token blocks): "
              f"{_gib(plan.kv_tokens * plan.kv_bytes_per_token)} before tensor parallelism"]
    if k:
        lines.append(f"MTP speculative decoding, k={k}: layer weights {_gib(plan.weights.mtp)}, its KV "
                     f"{_gib(plan.kv_tokens * per_layer)}, draft logits in the activations")
    tokens = max(plan.max_num_batched_tokens, plan.max_num_seqs * (k + 1))
    lines += [f"activations per GPU: T × (3·D + 2·(Hq+KV)·hd + 3·F + 2·E) × 2 B + S·(k+1)·V·4 B × 2 "
              f"(T = {tokens}, S = {plan.max_num_seqs}); reserve: max({RESERVE_FRACTION:.0%} of the GPU, "
              f"activations)",
              f"smallest tensor-parallel size that fits (tried {', '.join(map(str, plan.tp_sizes))}; budget "
              f"{plan.gpu_memory_utilization:g} × GPU memory):"]
    for f in plan.gpus:
        size = f"TP {f.tensor_parallel_size}" if f.fits else f"does not fit even at TP {plan.tp_sizes[-1]}"
        lines += [f"  {f.gpu.label}: {size}, per GPU {_gib(f.used)} of {_gib(f.budget)}",
                  f"      weights {_gib(f.weights)} + KV {_gib(f.kv_cache)} + reserve {_gib(f.reserve)} "
                  f"(activations {_gib(f.activations)})"]
    return "\n".join(lines)


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """`glm45 plan`'s flags, with vLLM's names; values are checked by plan_memory (one-line errors)."""
    parser.add_argument("model", metavar="MODEL",
                        help="a checkpoint folder, a config.json, or GLM-4.5, GLM-4.5-Air (-FP8 for the FP8 releases)")
    parser.add_argument("--quantization", default="auto", help=f"weight format: {', '.join(QUANTIZATIONS)} "
                        "(auto: as the checkpoint is stored)")
    parser.add_argument("--lm-head-quantization", default=None,
                        help="the LM heads' own format: fp8, int8, int4 or none (bf16); default: as the weights")
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto (the model's dtype) or fp8")
    parser.add_argument("--max-model-len", type=int, default=None, help="context length; default: the model's")
    parser.add_argument("--max-num-seqs", type=int, default=1,
                        help="sequences held at --max-model-len at once (default 1: what the engine needs to start)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens in one step (activations)")
    parser.add_argument("--speculative-num-steps", type=int, default=0, help="MTP draft tokens per step (0: off)")
    parser.add_argument("--tensor-parallel-size", type=int, default=None,
                        help="plan this size only; default: the smallest power of two that fits")
    gpu = parser.add_mutually_exclusive_group()
    gpu.add_argument("--gpu", default=None, help=f"one GPU kind: {', '.join(GPUS)}; default: each")
    gpu.add_argument("--gpu-memory", type=float, default=None, metavar="GiB", help="a GPU of this many GiB")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="share of each GPU to fill")


def cmd_plan(args: argparse.Namespace) -> int:
    gpus = None
    if args.gpu is not None:
        name = args.gpu.upper()
        if name not in GPUS:
            raise ValueError(f"unknown GPU {args.gpu!r}; known: {', '.join(GPUS)} (or --gpu-memory GiB)")
        gpus = [GPUS[name]]
    elif args.gpu_memory is not None:
        if args.gpu_memory <= 0:
            raise ValueError(f"--gpu-memory must be positive, got {args.gpu_memory}")
        gpus = [GpuSpec("GPU", int(args.gpu_memory * GiB))]
    plan = plan_model(args.model, quantization=args.quantization, lm_head_quantization=args.lm_head_quantization,
                      kv_cache_dtype=args.kv_cache_dtype,
                      max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                      num_speculative_tokens=args.speculative_num_steps,
                      max_num_batched_tokens=args.max_num_batched_tokens,
                      gpu_memory_utilization=args.gpu_memory_utilization, gpus=gpus,
                      tensor_parallel_size=args.tensor_parallel_size)
    print(describe(plan))
    return 0
