"""Where a plan's model comes from: the built-in GLM-4.5 / GLM-4.5-Air configs, a config.json, or a local
checkpoint (its stored bytes, read from the safetensors headers, and its quantization format)."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

from glm45.config import ModelConfig
from glm45.plan.accounting import LABELS, WeightBytes

BUILTIN_MODELS = {"glm-4.5": "GLM-4.5.json", "glm-4.5-air": "GLM-4.5-Air.json"}
# The GLM-4.5 FP8 releases' quantization_config (see glm45/plan/configs and the reference README).
FP8_RELEASE_QUANTIZATION = {
    "quant_method": "compressed-tensors", "format": "float-quantized",
    "config_groups": {"group_0": {"targets": ["Linear"],
                                  "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                                  "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                                                        "dynamic": True}}},
    "ignore": ["lm_head", "re:.*mlp.gate$"],
}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


def part_of(name: str, config: ModelConfig) -> str:
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
            parts[part_of(name, config)] += end - begin
    return WeightBytes(**parts) if files else None


def load_model_source(model: str) -> tuple[ModelConfig, str, Path | None]:
    """(config, where it came from, the checkpoint folder or None) for a known model's name (GLM-4.5,
    GLM-4.5-Air, their -FP8 releases; `zai-org/` optional), a checkpoint folder or a config.json file."""
    key = model.lower().removeprefix("zai-org/")
    builtin = BUILTIN_MODELS.get(key.removesuffix("-fp8"))
    if builtin is not None:
        raw = json.loads((Path(__file__).parent / "configs" / builtin).read_text())
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
    present = {part_of(name, config) for name in raw.get("weight_map") or {}}
    if not total or not present:
        return None
    parts = {p: getattr(computed, p) if p in present else 0 for p in LABELS}
    scale = total / max(1, sum(parts.values()))
    return WeightBytes(**{p: round(b * scale) for p, b in parts.items()})
