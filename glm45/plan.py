"""Memory planning: what a GLM-4.5-family model's weights, KV cache and activations take on a GPU, and the
smallest tensor-parallel size that fits — `glm45 plan`, and the accounting the engine can log at startup.

Pure accounting: shapes come from `config.json` (and, for a local checkpoint, the stored bytes from its
safetensors headers); nothing is allocated and no weight is read. Sizes are per GPU under glm45's tensor
parallelism (parallel/tensor_parallel.py: heads, MLP and expert intermediates split; KV heads split while
there are at least as many as ranks, else one per rank; vocabulary rows split; norms and routers replicated).

    weights      Σ over tensors: linear layers by the format's rule (WEIGHT_FORMATS); embeddings, LM head,
                 MTP eh_proj, norms and biases in bf16 (as in the FP8 releases; the same choice for int8 and
                 int4 here); routers and their bias in fp32 (as the loader keeps them). The MTP layer is
                 resident only when speculative decoding is on. For a checkpoint served in its own format,
                 each part is scaled to the bytes its safetensors files hold.
    KV per token 2 (K, V) × layers × KV heads × head_dim × bytes, plus one layer (the MTP layer's own cache)
                 when speculative decoding is on; fp8 adds one fp32 scale per layer for K and for V.
    KV           max_num_seqs × ⌈(max_model_len + k) / 16⌉ × 16 tokens: every sequence at full length at once,
                 in 16-token blocks, with room for its k draft tokens.
    activations  T × (3·D + 2·(Hq + KV)·hd + 3·F + 2·E) × 2 bytes        one layer's live tensors for a step
                 + S × (k + 1) × V × 4 bytes × 2                        fp32 logits and sampling probabilities
                 T = max(max_num_batched_tokens, S·(k+1)), S = max_num_seqs, Hq/KV = this rank's heads,
                 F = max(intermediate, top_k·moe_intermediate + shared·moe_intermediate) / tp, E = experts.
    reserve      max(5% of the GPU, activations): the engine leaves 5% of the GPU beside the weights and the
                 KV cache for activations, CUDA graphs and the CUDA context (engine._default_kv_budget).
    fits         weights + KV + reserve ≤ gpu_memory_utilization × GPU memory, per GPU.

GPUs: H100 79.1 GiB, H200 139.8 GiB (the totals torch reports). `--max-num-seqs` defaults to 1: one sequence
at the full context, what the engine needs to start. Quantized weights and an fp8 cache are counted as held
in their format; until the engine keeps them so (it dequantizes FP8 checkpoints to bf16 at load today), plan
today's engine with quantization="bf16" and kv_cache_dtype="auto".

GLM-4.5's own hardware table (zai-org/GLM-4.5 README, July 2025: MTP on, batch ≤ 8, FP8 cache) is checked in
tests/test_plan.py with FP8 cache, k = 3 and 8 sequences: of 16K tokens each for the minimum table, which
this accounting reproduces (GLM-4.5 BF16 H100×16 / H200×8, FP8 H100×8 / H200×4; Air BF16 H100×4 / H200×2,
FP8 H100×2 / H200×1), and of 128K tokens each for the full-context table, which lists twice those counts.
The Air rows and GLM-4.5 FP8 on H200 come out as listed; three GLM-4.5 rows come out at half:
  - FP8 on H100 (8, listed 16) and BF16 on H100 (16, listed 32): GLM-4.5 has 8 KV heads, so from TP 8 on
    every GPU keeps one head and the same 23.3 GiB of cache for 8 × 128K tokens, and more GPUs shrink only
    the weights. At the smaller size 1.2 and 1.8 GiB per GPU are left; setting aside 3% more of each GPU
    (--gpu-memory-utilization 0.87) gives the listed counts.
  - BF16 on H200 (8, listed 16): an FP8 cache fits at TP 8 with 11.8 GiB to spare; a BF16 cache
    (--kv-cache-dtype auto) takes 16, as listed.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import struct
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from glm45.config import ModelConfig

GiB = 1 << 30
RESERVE_FRACTION = 0.05  # of the GPU's memory, left for activations (see engine._default_kv_budget)
BLOCK_SIZE = 16          # tokens per KV-cache block (EngineConfig.block_size)
TP_SIZES = (1, 2, 4, 8, 16, 32, 64)


# ---------------------------------------------------------------------------------------------- formats
@dataclass(frozen=True)
class WeightFormat:
    """How a linear layer's weight [out, in] is stored: `bits` per weight, plus one scale (and one minimum)
    of `scale_bytes` per block of `block_rows` × `block_cols` weights; 0 means the whole dimension."""

    name: str
    bits: int
    block_rows: int = 0
    block_cols: int = 0
    scale_bytes: int = 0
    min_bytes: int = 0
    strict_blocks: bool = False  # the input dimension must be a whole number of blocks (int8/int4 kernels)
    note: str = ""

    @property
    def quantized(self) -> bool:
        return self.bits < 16

    def nbytes(self, rows: int, cols: int) -> int:
        data = math.ceil(rows * cols * self.bits / 8)
        if not self.scale_bytes:
            return data
        blocks = math.ceil(rows / (self.block_rows or rows)) * math.ceil(cols / (self.block_cols or cols))
        return data + blocks * (self.scale_bytes + self.min_bytes)

    def block_problem(self, cols: int) -> str | None:
        if self.strict_blocks and cols % self.block_cols:
            return f"{cols} input columns are not a whole number of {self.name} blocks of {self.block_cols}"
        return None


WEIGHT_FORMATS: dict[str, WeightFormat] = {f.name: f for f in (
    WeightFormat("fp32", 32, note="float32"),
    WeightFormat("bf16", 16, note="bfloat16"),
    # e4m3, one fp32 scale per output channel (the compressed-tensors layout of the GLM-4.5-FP8 releases)
    WeightFormat("fp8", 8, block_rows=1, scale_bytes=4, note="e4m3, one fp32 scale per output channel"),
    # e4m3, one fp32 scale per 128×128 block (`weight_scale_inv`, DeepSeek's layout)
    WeightFormat("fp8_block", 8, block_rows=128, block_cols=128, scale_bytes=4,
                 note="e4m3, one fp32 scale per 128×128 block"),
    # like llama.cpp's Q8_0: 32 int8 weights + one fp16 scale = 34 bytes per 32 weights
    WeightFormat("int8", 8, block_rows=1, block_cols=32, scale_bytes=2, strict_blocks=True,
                 note="int8 in blocks of 32 along the input, one fp16 scale each (34 bytes / 32, like Q8_0)"),
    # like Q4_1: 32 4-bit weights + an fp16 scale + an fp16 minimum = 20 bytes per 32 weights
    WeightFormat("int4", 4, block_rows=1, block_cols=32, scale_bytes=2, min_bytes=2, strict_blocks=True,
                 note="4-bit in blocks of 32 along the input, fp16 scale and minimum (20 bytes / 32, like Q4_1)"),
)}
QUANTIZATIONS = ("auto", "bf16", "fp8", "int8", "int4")
KV_CACHE_DTYPES = {"fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}  # and "auto": the model's dtype


# ---------------------------------------------------------------------------------------------- GPUs
@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_bytes: int  # what torch.cuda.mem_get_info reports as total

    @property
    def label(self) -> str:
        return f"{self.name} ({self.memory_bytes / GiB:.1f} GiB)"


GPUS = {
    # H100 80GB SXM: torch reports a total of 79.1–79.3 GiB depending on the driver; the lower end.
    "H100": GpuSpec("H100", int(79.1 * GiB)),
    # H200 141GB: the total torch.cuda.mem_get_info() reported on one here (nvidia-smi: 143771 MiB).
    "H200": GpuSpec("H200", 150_109_880_320),
}


# ---------------------------------------------------------------------------------------------- bytes
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
    kind: str  # linear (stored in the weight format) | dense (bf16) | router (fp32)
    name: str
    rows: int
    cols: int = 1
    count: int = 1


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
    out += [_Tensor("embeddings", "dense", "embed_tokens", vocab_rows, D, 1 if config.tie_word_embeddings else 2),
            _Tensor("embeddings", "dense", "norm", D)]
    if config.num_nextn_predict_layers:
        n = config.num_hidden_layers
        out += _block(config, tp, "mtp", config.is_moe_layer(n), f"model.layers.{n}")
        out += [_Tensor("mtp", "dense", "embed_tokens and shared_head.head", vocab_rows, D, 2),
                _Tensor("mtp", "dense", "eh_proj", D, 2 * D),
                _Tensor("mtp", "dense", "enorm, hnorm, shared_head.norm", D, 1, 3)]
    return out


def weight_bytes(config: ModelConfig, fmt: WeightFormat, tp: int = 1) -> WeightBytes:
    """The weights' bytes on one of `tp` ranks (tp=1: the whole model), computed from the shapes."""
    dense_bytes = fmt.bits // 8 if fmt.bits > 16 else 2  # unquantized tensors: bf16 (fp32 for an fp32 model)
    parts = dict.fromkeys(LABELS, 0)
    for t in _tensors(config, tp):
        if t.kind == "linear":
            size = fmt.nbytes(t.rows, t.cols)
        else:
            size = t.rows * t.cols * (4 if t.kind == "router" else dense_bytes)
        parts[t.part] += size * t.count
    return WeightBytes(**parts)


def block_problems(config: ModelConfig, fmt: WeightFormat, tp: int) -> list[str]:
    """The linear layers whose per-rank input dimension the format's blocks do not divide."""
    return [f"{t.name}: {problem}" for t in _tensors(config, tp)
            if t.kind == "linear" and (problem := fmt.block_problem(t.cols))]


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


# ---------------------------------------------------------------------------------------------- checkpoints
BUILTIN_MODELS = {"glm-4.5": "GLM-4.5.json", "glm-4.5-air": "GLM-4.5-Air.json"}
# The GLM-4.5 FP8 releases' quantization_config (see glm45/plan_configs and the reference README).
FP8_RELEASE_QUANTIZATION = {
    "quant_method": "compressed-tensors", "format": "float-quantized",
    "config_groups": {"group_0": {"targets": ["Linear"],
                                  "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                                  "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                                                        "dynamic": True}}},
    "ignore": ["lm_head", "re:.*mlp.gate$"],
}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


def checkpoint_format(config: ModelConfig) -> str:
    """The weight format a checkpoint is stored in, from its `quantization_config` and `torch_dtype`."""
    qc = config.quantization_config
    if not qc:
        return "fp32" if config.torch_dtype == "float32" else "bf16"
    method = str(qc.get("quant_method", "")).lower()
    if method == "fp8":  # DeepSeek / vLLM style
        return "fp8_block" if qc.get("weight_block_size") else "fp8"
    if method in WEIGHT_FORMATS:  # glm45's own checkpoints name their format
        return method
    if method == "compressed-tensors":
        for group in (qc.get("config_groups") or {}).values():
            weights = group.get("weights") or {}
            bits, kind, strategy = weights.get("num_bits"), weights.get("type"), weights.get("strategy")
            if kind == "float" and bits == 8:
                return "fp8_block" if strategy == "block" else "fp8"
            if kind == "int" and bits in (8, 4):
                return f"int{bits}"
    raise ValueError(f"quantization_config {json.dumps(qc)[:200]} is not a format glm45 plans for; "
                     f"supported: {', '.join(WEIGHT_FORMATS)}")


def _part_of(name: str, config: ModelConfig) -> str:
    match = _LAYER.match(name)
    if match is None:
        return "embeddings"  # embed_tokens, lm_head, norm
    layer, rest = int(match.group(1)), match.group(2)
    if layer >= config.num_hidden_layers:
        return "mtp"
    if rest.startswith(("self_attn.", "input_layernorm")):
        return "attention"
    if rest.startswith("mlp.shared_experts."):
        return "shared_experts"
    return "routed_experts" if config.is_moe_layer(layer) else "dense_mlp"


def stored_bytes(folder: Path, config: ModelConfig) -> WeightBytes | None:
    """Bytes of every tensor in the folder's safetensors files (headers only), by part; None without any."""
    parts = dict.fromkeys(LABELS, 0)
    files = sorted(folder.glob("*.safetensors"))
    for path in files:
        with open(path, "rb") as f:
            try:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
            except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path} has no readable safetensors header: {e}") from e
        header.pop("__metadata__", None)
        for name, info in header.items():
            try:
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}: tensor {name!r} has an unreadable header entry {info!r}") from e
            parts[_part_of(name, config)] += end - begin
    return WeightBytes(**parts) if files else None


def load_model_source(model: str) -> tuple[ModelConfig, str, Path | None]:
    """(config, where it came from, the checkpoint folder or None) for a known model's name (GLM-4.5,
    GLM-4.5-Air, their -FP8 releases; `zai-org/` optional), a checkpoint folder or a config.json file."""
    key = model.lower().removeprefix("zai-org/")
    builtin = BUILTIN_MODELS.get(key.removesuffix("-fp8"))
    if builtin is not None:
        raw = json.loads((Path(__file__).parent / "plan_configs" / builtin).read_text())
        if key.endswith("-fp8"):
            raw["quantization_config"] = FP8_RELEASE_QUANTIZATION
        return ModelConfig.from_dict(raw), f"zai-org/{model.split('/')[-1]} (built-in config.json)", None
    path = Path(model)
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        names = ", ".join(n for base in ("GLM-4.5", "GLM-4.5-Air") for n in (base, f"{base}-FP8"))
        raise FileNotFoundError(f"{model!r} is not a folder with a config.json, a config.json file, "
                                f"or one of the known models ({names})")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{config_file} is not a config.json (a JSON object)")
    return ModelConfig.from_dict(raw), str(config_file), config_file.parent


def index_bytes(folder: Path, config: ModelConfig, computed: WeightBytes) -> WeightBytes | None:
    """Without safetensors files, `model.safetensors.index.json`'s total_size, shared among the parts its
    weight map names in proportion to the computed bytes; None without an index or a total."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return None
    raw = json.loads(index.read_text())
    total = (raw.get("metadata") or {}).get("total_size")
    present = {_part_of(name, config) for name in raw.get("weight_map") or {}}
    if not total or not present:
        return None
    parts = {p: getattr(computed, p) if p in present else 0 for p in LABELS}
    scale = total / max(1, sum(parts.values()))
    return WeightBytes(**{p: round(b * scale) for p, b in parts.items()})


# ---------------------------------------------------------------------------------------------- the plan
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


def resolve_kv_cache_dtype(kv_cache_dtype: str, weight_format: str) -> tuple[str, int]:
    """(name, bytes per element): `auto` is the model's dtype (bf16; fp32 for an fp32 model)."""
    kv = (kv_cache_dtype or "auto").lower()
    if kv == "auto":
        return ("fp32", 4) if weight_format == "fp32" else ("bf16", 2)
    if kv not in KV_CACHE_DTYPES:
        raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r}; supported: auto, {', '.join(KV_CACHE_DTYPES)}")
    return kv, KV_CACHE_DTYPES[kv]


def _tp_sizes(config: ModelConfig, fmt: WeightFormat, tensor_parallel_size: int | None) -> tuple[int, ...]:
    from glm45.parallel.tensor_parallel import _unsplittable, allowed_sizes

    if tensor_parallel_size is not None:
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be ≥ 1, got {tensor_parallel_size}")
        problems = _unsplittable(config, tensor_parallel_size, False) or block_problems(config, fmt,
                                                                                         tensor_parallel_size)
        if problems:
            raise ValueError(f"tensor_parallel_size={tensor_parallel_size} does not evenly split "
                             f"{', '.join(problems)} of this model; allowed: {allowed_sizes(config, False)}")
        return (tensor_parallel_size,)
    sizes = tuple(n for n in allowed_sizes(config, False, limit=max(TP_SIZES))
                  if n in TP_SIZES and not block_problems(config, fmt, n))
    if not sizes:
        raise ValueError(f"no tensor-parallel size splits this model in {fmt.name}: "
                         f"{'; '.join(block_problems(config, fmt, 1))}")
    return sizes


def plan_memory(config: ModelConfig, *, quantization: str = "auto", kv_cache_dtype: str = "auto",
                max_model_len: int | None = None, max_num_seqs: int = 1, num_speculative_tokens: int = 0,
                max_num_batched_tokens: int = 2048, gpu_memory_utilization: float = 0.9,
                gpus: list[GpuSpec] | None = None, tensor_parallel_size: int | None = None,
                stored: WeightBytes | None = None, model: str = "", source: str = "") -> MemoryPlan:
    """The memory accounting of `config` served with these settings (vLLM's names), per GPU kind.

    `stored`: the checkpoint's bytes by part (stored_bytes); when the checkpoint is served in its own
    format, every rank's share is scaled by stored / computed bytes, part by part, so the plan counts what
    the files really hold. `tensor_parallel_size`: plan that size only, instead of the smallest that fits."""
    fmt_name = resolve_quantization(config, quantization)
    fmt = WEIGHT_FORMATS[fmt_name]
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
    if (problems := block_problems(config, fmt, 1)):
        raise ValueError(f"{fmt.name} cannot store this model: {'; '.join(problems)}")

    computed = weight_bytes(config, fmt)
    ratios = None
    if stored is not None and fmt_name == checkpoint_format(config):
        ratios = {p: getattr(stored, p) / getattr(computed, p) if getattr(computed, p) else 0.0 for p in LABELS}
    # Every sequence at full length at once, in whole blocks, with room for its k draft tokens.
    kv_tokens = max_num_seqs * math.ceil((max_model_len + k) / BLOCK_SIZE) * BLOCK_SIZE
    kv_layers = config.num_hidden_layers + (1 if k else 0)
    kv_scales = 2 * kv_layers * 4 if kv_bytes == 1 else 0  # one fp32 scale per layer for K and for V

    def share(gpu: GpuSpec, tp: int) -> GpuFit:
        w = weight_bytes(config, fmt, tp).scaled(ratios)
        weights = w.total - (0 if k else w.mtp)
        kv = kv_tokens * kv_bytes_per_token(config, kv_bytes, tp, bool(k)) + kv_scales
        act = activation_bytes(config, tp, max_num_batched_tokens, max_num_seqs, k)
        reserve = max(int(RESERVE_FRACTION * gpu.memory_bytes), act)
        return GpuFit(gpu, tp, weights, kv, act, reserve, int(gpu_memory_utilization * gpu.memory_bytes))

    sizes = _tp_sizes(config, fmt, tensor_parallel_size)
    fits = []
    for gpu in gpus or list(GPUS.values()):
        tried = [share(gpu, tp) for tp in sizes]
        fits.append(next((f for f in tried if f.fits), replace(tried[-1], tensor_parallel_size=None)))
    return MemoryPlan(model, source, config, fmt_name, kv_name, kv_bytes, max_model_len, max_num_seqs, k,
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


# ---------------------------------------------------------------------------------------------- report
def _gib(n: float) -> str:
    """Bytes in GiB (MiB below one GiB, so that small models do not read 0.00)."""
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.2f} MiB"


def describe(plan: MemoryPlan) -> str:
    """The plan as text: what `glm45 plan` prints and what the engine logs at startup."""
    c, k, fmt = plan.config, plan.num_speculative_tokens, WEIGHT_FORMATS[plan.quantization]
    high = "; embeddings, heads, norms and biases bf16, routers fp32" if fmt.quantized else ""
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


# ---------------------------------------------------------------------------------------------- command line
def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """`glm45 plan`'s flags, with vLLM's names; values are checked by plan_memory (one-line errors)."""
    parser.add_argument("model", metavar="MODEL",
                        help="a checkpoint folder, a config.json, or GLM-4.5, GLM-4.5-Air (-FP8 for the FP8 releases)")
    parser.add_argument("--quantization", default="auto", help=f"weight format: {', '.join(QUANTIZATIONS)} "
                        "(auto: as the checkpoint is stored)")
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
    plan = plan_model(args.model, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                      max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                      num_speculative_tokens=args.speculative_num_steps,
                      max_num_batched_tokens=args.max_num_batched_tokens,
                      gpu_memory_utilization=args.gpu_memory_utilization, gpus=gpus,
                      tensor_parallel_size=args.tensor_parallel_size)
    print(describe(plan))
    return 0
