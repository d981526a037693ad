"""Model configuration: the architecture of a GLM-4.5-family checkpoint, read from its `config.json`.

Two layouts of `config.json` exist in the wild: the one released with the models (transformers 4.54
era, `rope_theta` and `partial_rotary_factor` at the top level) and the one transformers 5 writes
(`rope_parameters: {rope_type, rope_theta, partial_rotary_factor}`). Both are read; `to_hf_dict`
writes both so that old and new readers load what we save.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from glm45.cli_args import arg

ASSETS = Path(__file__).resolve().parent / "assets"
SUPPORTED_MODEL_TYPES = ("glm4_moe",)
QUANTIZATIONS = ("fp8", "int8", "int4")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
SUPPORTED_ARCHITECTURES = ("Glm4MoeForCausalLM",)
# Upper bounds far above any released checkpoint (GLM-4.5: 92 layers, hidden 5120, 160 experts, a vocabulary of
# 151,552, 131,072 positions), so that a damaged or hostile config.json is refused before anything is allocated.
CONFIG_LIMITS = {
    "vocab_size": 2**22, "hidden_size": 2**16, "intermediate_size": 2**19, "moe_intermediate_size": 2**18,
    "num_hidden_layers": 1024, "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 4096,
    "n_routed_experts": 4096, "num_experts_per_tok": 256, "n_group": 4096, "topk_group": 4096,
    "max_position_embeddings": 2**24, "first_k_dense_replace": 1024, "n_shared_experts": 64,
    "num_nextn_predict_layers": 16,
}


@dataclass
class ModelConfig:
    vocab_size: int = 151552
    hidden_size: int = 4096
    intermediate_size: int = 10944
    moe_intermediate_size: int = 1408
    num_hidden_layers: int = 46
    num_attention_heads: int = 96
    num_key_value_heads: int = 8
    head_dim: int = 128
    attention_bias: bool = True
    use_qk_norm: bool = False
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1_000_000.0
    partial_rotary_factor: float = 0.5
    max_position_embeddings: int = 131072
    first_k_dense_replace: int = 1
    n_routed_experts: int = 128
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    num_nextn_predict_layers: int = 1
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    quantization_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        self.eos_token_id = list(self.eos_token_id or [])
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def rotary_dim(self) -> int:
        """Number of leading dims of each head that RoPE rotates (the rest pass through)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_moe_layers(self) -> int:
        return max(0, self.num_hidden_layers - self.first_k_dense_replace)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        positive = [
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "n_routed_experts",
            "num_experts_per_tok", "n_group", "topk_group", "max_position_embeddings",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"config field {name!r} must be a positive integer, got {value!r}")
        for name in ("first_k_dense_replace", "n_shared_experts", "num_nextn_predict_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"config field {name!r} must be a non-negative integer, got {value!r}")
        for name, limit in CONFIG_LIMITS.items():
            if getattr(self, name) > limit:
                raise ValueError(f"config field {name!r} is {getattr(self, name)}, more than glm45 accepts ({limit})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"config field 'num_attention_heads' ({self.num_attention_heads}) must be divisible by "
                f"'num_key_value_heads' ({self.num_key_value_heads}) for grouped-query attention"
            )
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(
                f"config field 'num_experts_per_tok' ({self.num_experts_per_tok}) cannot exceed "
                f"'n_routed_experts' ({self.n_routed_experts})"
            )
        if self.n_routed_experts % self.n_group:
            raise ValueError(
                f"config field 'n_routed_experts' ({self.n_routed_experts}) must be divisible by "
                f"'n_group' ({self.n_group})"
            )
        if self.topk_group > self.n_group:
            raise ValueError(f"config field 'topk_group' ({self.topk_group}) cannot exceed 'n_group' ({self.n_group})")
        experts_per_group = self.n_routed_experts // self.n_group
        if self.n_group > 1 and experts_per_group < 2:
            raise ValueError(
                "config fields 'n_routed_experts'/'n_group' leave fewer than 2 experts per group; "
                "groups are scored by the sum of their top-2 experts"
            )
        if self.num_experts_per_tok > self.topk_group * experts_per_group:
            raise ValueError(
                f"config field 'num_experts_per_tok' ({self.num_experts_per_tok}) exceeds the experts "
                f"reachable in 'topk_group' ({self.topk_group}) groups of {experts_per_group}"
            )
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ValueError(
                f"config field 'partial_rotary_factor' must be in (0, 1], got {self.partial_rotary_factor}"
            )
        if self.rotary_dim % 2:
            raise ValueError(
                f"config fields 'head_dim' * 'partial_rotary_factor' = {self.rotary_dim} must be even"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"config field 'hidden_act' must be 'silu' for GLM-4.5, got {self.hidden_act!r}")
        if self.rope_theta <= 0:
            raise ValueError(f"config field 'rope_theta' must be positive, got {self.rope_theta}")

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        if not isinstance(raw, dict):
            raise ValueError(f"invalid config.json: it must be a JSON object, got {type(raw).__name__}")
        try:
            return cls._from_dict(raw)
        except (TypeError, AttributeError) as e:  # e.g. a field with the wrong kind of value
            raise ValueError(f"invalid config.json: {e}") from e

    @classmethod
    def _from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config field 'model_type' is {model_type!r}; glm45 supports {list(SUPPORTED_MODEL_TYPES)}"
            )
        architectures = raw.get("architectures") or list(SUPPORTED_ARCHITECTURES)
        unknown = [a for a in architectures if a not in SUPPORTED_ARCHITECTURES]
        if unknown:
            raise ValueError(
                f"config field 'architectures' names {unknown}; glm45 supports {list(SUPPORTED_ARCHITECTURES)}"
            )
        values = {f.name: raw[f.name] for f in fields(cls) if f.name in raw}
        if "head_dim" not in raw and "hidden_size" in raw and "num_attention_heads" in raw:
            values["head_dim"] = raw["hidden_size"] // raw["num_attention_heads"]
        if values.get("torch_dtype") is None:
            values["torch_dtype"] = raw.get("dtype") or "bfloat16"
        if "num_mtp_layers" in raw and "num_nextn_predict_layers" not in raw:
            values["num_nextn_predict_layers"] = raw["num_mtp_layers"]

        rope = raw.get("rope_parameters") or {}
        legacy_scaling = raw.get("rope_scaling")
        if legacy_scaling:
            rope = {**legacy_scaling, **rope}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(
                f"config field 'rope_parameters.rope_type' is {rope_type!r}; only 'default' RoPE is supported"
            )
        if "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
        if "partial_rotary_factor" in rope:
            values["partial_rotary_factor"] = rope["partial_rotary_factor"]
        values["rope_theta"] = float(values.get("rope_theta", cls.rope_theta))
        values["partial_rotary_factor"] = float(values.get("partial_rotary_factor", cls.partial_rotary_factor))
        return cls(**values)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"no config.json in {path}")
        try:
            raw = json.loads(config_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ValueError(f"{config_file} is not valid JSON: {e}") from e
        return cls.from_dict(raw)

    # ------------------------------------------------------------------ writing
    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` contents, readable by transformers 4.54+ and 5.x alike."""
        out = asdict(self)
        out.pop("quantization_config")
        if self.quantization_config is not None:
            out["quantization_config"] = self.quantization_config
        out["architectures"] = list(SUPPORTED_ARCHITECTURES)
        out["model_type"] = "glm4_moe"
        out["rope_scaling"] = None
        out["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": self.rope_theta,
            "partial_rotary_factor": self.partial_rotary_factor,
        }
        out["attention_dropout"] = 0.0
        out["use_cache"] = True
        return out


@dataclass
class EngineConfig:
    """How the engine runs a model. Field names follow vLLM's flags (`--max-model-len` ↔ `max_model_len`)."""

    model: str | None = arg(None, "a local folder; None means the bundled small model")
    tokenizer: str | None = arg(None, "defaults to the model folder")
    dtype: str = arg("auto", "auto | bfloat16 | float16 | float32")
    device: str = arg("auto", "auto (cuda if available) | cpu | cuda | cuda:N")
    max_model_len: int | None = arg(None, "defaults to the model's context length, capped by the KV budget")
    max_num_seqs: int = arg(64, "sequences in one batch")
    max_num_batched_tokens: int = arg(2048, "token budget of one step (chunked prefill splits longer prompts)")
    block_size: int = arg(16, "tokens per KV-cache block")
    kv_cache_memory_bytes: int | None = arg(None, "KV-cache budget; None: a default per device")
    gpu_memory_utilization: float = arg(0.9, "on CUDA, without a KV budget: the share of the GPU to fill")
    num_gpu_blocks_override: int | None = arg(None, "exact number of KV blocks (tests, tuning)")
    enable_prefix_caching: bool = arg(True, "share the KV blocks of prompts that begin alike")
    num_speculative_tokens: int = arg(0, "MTP draft tokens per step (0 disables speculative decoding)")
    seed: int = arg(0, "for requests without their own seed")
    tensor_parallel_size: int = arg(1, "ranks that split the model (spawned here, or launched by torchrun)")
    enable_expert_parallel: bool = arg(False, "partition routed experts over those ranks instead of splitting each")
    quantization: str | None = arg(None, "keep weights quantized: fp8 | int8 | int4 (FP8 checkpoints are detected "
                                         "and kept in FP8 without this flag; none dequantizes them)")
    lm_head_quantization: str | None = arg(None, "the LM heads' own format: fp8 | int8 | int4 | none (the compute "
                                                 "dtype); default: as the checkpoint keeps them, else like the "
                                                 "other weights (int4 weights with int8 heads: like Q4_K_M)")
    kv_cache_dtype: str = arg("auto", "auto (the model's dtype) | fp8 (e4m3, half the KV bytes)")
    threads: int | None = arg(None, "CPU threads for the model's kernels (default: OMP_NUM_THREADS, else torch's "
                                    "count of the cores)")
    enforce_eager: bool = arg(False, "never run the captured decode step (CUDA graphs, or the CPU step program)")
    num_scheduler_steps: int = arg(8, "on CPUs, the most decode steps run in one call of the captured step (a run "
                                      "lasts at most ~50 ms) when every sequence decodes plainly (greedy or "
                                      "sampled; no penalties, bias, log-probabilities, constraints or adapters); "
                                      "1 turns that off")
    enable_lora: bool = arg(False, "serve LoRA adapters per request (see --lora-modules)")
    max_loras: int = arg(4, "LoRA adapters held at once (each can be in any batch)")
    max_lora_rank: int = arg(16, "the largest LoRA rank an adapter may have")
    cuda_graph_sizes: list[int] | None = arg(None, "row counts the decode step is captured for (CUDA graphs, or the "
                                                   "CPU step program); default 1, 2, 4, …, 64")

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be ≥ 1, got {self.max_model_len}")
        if not 1 <= self.num_scheduler_steps <= 64:
            raise ValueError(f"num_scheduler_steps must be in [1, 64], got {self.num_scheduler_steps}")
        if not 0 <= self.num_speculative_tokens <= 8:
            raise ValueError(f"num_speculative_tokens must be in [0, 8], got {self.num_speculative_tokens}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError(f"num_gpu_blocks_override must be ≥ 1, got {self.num_gpu_blocks_override}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1:
            raise ValueError(f"kv_cache_memory_bytes must be ≥ 1, got {self.kv_cache_memory_bytes}")
        if self.quantization is not None and self.quantization not in (*QUANTIZATIONS, "none"):
            raise ValueError(f"quantization {self.quantization!r} is not supported; choose one of "
                             f"{', '.join(QUANTIZATIONS)}, none (or leave it unset)")
        if self.lm_head_quantization is not None:
            if self.lm_head_quantization not in (*QUANTIZATIONS, "none"):
                raise ValueError(f"lm_head_quantization {self.lm_head_quantization!r} is not supported; choose one "
                                 f"of {', '.join(QUANTIZATIONS)}, none (or leave it unset)")
            if self.quantization == "none":
                raise ValueError("lm_head_quantization applies to quantized weights, and quantization is none")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype {self.kv_cache_dtype!r} is not supported; choose one of "
                             f"{', '.join(KV_CACHE_DTYPES)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be ≥ 1, got {self.threads}")
        if self.max_loras < 1 or self.max_lora_rank < 1:
            raise ValueError(f"max_loras and max_lora_rank must be ≥ 1, got {self.max_loras} and {self.max_lora_rank}")
        if self.cuda_graph_sizes is not None and (not self.cuda_graph_sizes or min(self.cuda_graph_sizes) < 1):
            raise ValueError(f"cuda_graph_sizes must be positive row counts, got {self.cuda_graph_sizes}")


def bundled_model_path() -> Path:
    """The small trained model that ships with the package (the first checkpoint folder in assets/)."""
    candidates = sorted(p.parent for p in ASSETS.glob("*/config.json")) if ASSETS.is_dir() else []
    if not candidates:
        raise FileNotFoundError(f"no bundled model in {ASSETS}; pass a model folder explicitly")
    return candidates[0]
