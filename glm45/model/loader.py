"""Checkpoints: HF-layout safetensors folders ↔ `Glm4MoeForCausalLM`.

Loading builds the model on the meta device and assigns tensors read straight from memory-mapped files
(copy-on-write maps, so a tensor whose dtype already matches costs no copy and peak memory stays about
one copy of the weights). It accepts one `model.safetensors` or shards with `model.safetensors.index.json`,
per-expert tensors (the released layout) or fused expert stacks (transformers 5), and FP8 weights, which
it dequantises: every `X.weight` with a sibling `X.weight_scale` (per output channel, compressed-tensors)
or `X.weight_scale_inv` (128×128 blocks) becomes `W_fp8 · scale` in the requested dtype.

Any missing tensor, unexpected tensor, wrong shape or damaged file is an error that names it.

Name mapping between the model and the checkpoint (`{}` = layer index, `{e}` = expert):
    mtp.X                                ↔ model.layers.{num_hidden_layers}.X
    model.layers.{}.mlp.experts.gate_up_proj [E, 2I, D]
                                         ↔ model.layers.{}.mlp.experts.{e}.gate_proj.weight [I, D]
                                           + model.layers.{}.mlp.experts.{e}.up_proj.weight [I, D]
    model.layers.{}.mlp.experts.down_proj [E, D, I]
                                         ↔ model.layers.{}.mlp.experts.{e}.down_proj.weight [D, I]
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from glm45.config import ModelConfig

logger = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_SUFFIXES = ("_scale", "_scale_inv")
# Tensors some checkpoints carry that have no place in the model: activation scales (activations are
# quantised dynamically, if at all) and precomputed RoPE frequencies.
IGNORABLE = re.compile(r".*\.(input_scale|rotary_emb\.inv_freq)$")
# Parameters the reference keeps in float32 whatever the model dtype.
FLOAT32_PARAMS = re.compile(r".*\.mlp\.gate\.(weight|e_score_correction_bias)$")
EXPERT_STACK = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<kind>gate_up_proj|down_proj)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: what is wrong and which tensors or files are concerned."""


def resolve_dtype(dtype: torch.dtype | str | None, config: ModelConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = config.torch_dtype if dtype in (None, "auto") else dtype
    allowed = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16,
               "bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16, "half": torch.float16,
               "float": torch.float32}
    if name not in allowed:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of 'auto', {sorted(allowed)}")
    return allowed[name]


# ---------------------------------------------------------------------- reading safetensors files
class SafetensorsFile:
    """A memory-mapped .safetensors file: an 8-byte little-endian header length, a JSON header of
    {name: {dtype, shape, data_offsets}}, then the raw data. Tensors are zero-copy views of the map."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            size = path.stat().st_size
            if size < 8:
                raise CheckpointError(f"{path} is not a safetensors file (only {size} bytes)")
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise CheckpointError(
                    f"{path} is truncated or corrupt: its header claims {header_len} bytes but the file has {size}"
                )
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path} has a corrupt safetensors header: {e}") from e
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 0 else None
        header.pop("__metadata__", None)
        self.data_start = 8 + header_len
        data_size = size - self.data_start
        self.entries: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[info["dtype"]]
                shape = [int(s) for s in info["shape"]]
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{path}: tensor {name!r} has an unreadable header entry {info!r}") from e
            expected = math.prod(shape) * dtype.itemsize
            if end - begin != expected:
                raise CheckpointError(
                    f"{path}: tensor {name!r} has {end - begin} bytes of data for shape {shape} "
                    f"({expected} expected)"
                )
            if end > data_size:
                raise CheckpointError(
                    f"{path} is truncated: tensor {name!r} ends at byte {end} of the data section, "
                    f"which has only {data_size} bytes"
                )
            self.entries[name] = (dtype, shape, begin, end)

    def shape(self, name: str) -> list[int]:
        return self.entries[name][1]

    def get(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[name]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(self.map, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                offset=self.data_start + begin)
        return flat.view(shape)


class Checkpoint:
    """All tensors of a checkpoint folder, by name, whichever file holds them."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
        index_file = self.folder / "model.safetensors.index.json"
        if index_file.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index_file} is not a valid safetensors index: {e}") from e
            file_names = sorted(set(weight_map.values()))
        else:
            file_names = sorted(p.name for p in self.folder.glob("*.safetensors"))
            weight_map = {}
        if not file_names:
            raise CheckpointError(f"no .safetensors files in {self.folder}")
        missing_files = [n for n in file_names if not (self.folder / n).is_file()]
        if missing_files:
            raise CheckpointError(f"{index_file} names files that are not in {self.folder}: {missing_files}")
        self.files = {n: SafetensorsFile(self.folder / n) for n in file_names}
        self.location: dict[str, SafetensorsFile] = {}
        for file in self.files.values():
            for name in file.entries:
                if weight_map and weight_map.get(name) != file.path.name:
                    continue
                self.location[name] = file
        absent = [n for n in weight_map if n not in self.location]
        if absent:
            raise CheckpointError(f"the index lists tensors that are not in their files: {_some(absent)}")

    def __contains__(self, name: str) -> bool:
        return name in self.location

    def names(self) -> list[str]:
        return list(self.location)

    def shape(self, name: str) -> list[int]:
        return self.location[name].shape(name)

    def raw(self, name: str) -> torch.Tensor:
        return self.location[name].get(name)

    def weight(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, list[str]]:
        """The tensor `name` in `dtype`, dequantised if it has an FP8 scale; also the names it consumed."""
        tensor = self.raw(name)
        for suffix in SCALE_SUFFIXES:
            scale_name = name + suffix
            if scale_name in self:
                if tensor.dtype not in FP8_DTYPES:
                    raise CheckpointError(f"{name} has a {scale_name} but is {tensor.dtype}, not an FP8 dtype")
                return dequantize_fp8(tensor, self.raw(scale_name), name).to(dtype), [name, scale_name]
        if tensor.dtype in FP8_DTYPES:
            raise CheckpointError(f"{name} is stored in {tensor.dtype} but has no weight_scale/weight_scale_inv")
        return tensor.to(dtype), [name]


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """W = W_fp8 · scale, with scale per tensor [1], per output channel [out, 1], or per block [⌈out/b⌉, ⌈in/b⌉]."""
    w = weight.float()
    s = scale.float()
    out_features, in_features = w.shape
    if s.numel() == 1:
        return w * s.reshape(())
    if s.numel() == out_features and (s.dim() == 1 or s.shape[-1] == 1):
        return w * s.reshape(out_features, 1)
    if s.dim() == 2:
        block_out = math.ceil(out_features / s.shape[0])
        block_in = math.ceil(in_features / s.shape[1])
        if math.ceil(out_features / block_out) == s.shape[0] and math.ceil(in_features / block_in) == s.shape[1]:
            expanded = s.repeat_interleave(block_out, 0)[:out_features].repeat_interleave(block_in, 1)
            return w * expanded[:, :in_features]
    raise CheckpointError(f"{name}: cannot read FP8 scale of shape {list(s.shape)} for a weight {list(w.shape)}")


def _some(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" … and {len(names) - limit} more" if len(names) > limit else "")


# ---------------------------------------------------------------------- names
def checkpoint_prefix(internal: str, config: ModelConfig) -> str:
    return f"model.layers.{config.num_hidden_layers}." + internal[4:] if internal.startswith("mtp.") else internal


def has_mtp_tensors(checkpoint: Checkpoint, config: ModelConfig) -> bool:
    prefix = f"model.layers.{config.num_hidden_layers}."
    return any(name.startswith(prefix) for name in checkpoint.names())


# ---------------------------------------------------------------------- loading
def load_model(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    load_mtp: bool = True,
    progress: bool = True,
):
    from glm45.model.glm4_moe import Glm4MoeForCausalLM

    config = ModelConfig.from_pretrained(path)
    dtype = resolve_dtype(dtype, config)
    device = torch.device(device)
    checkpoint = Checkpoint(path)
    with_mtp = load_mtp and config.num_nextn_predict_layers > 0 and has_mtp_tensors(checkpoint, config)
    with torch.device("meta"):
        model = Glm4MoeForCausalLM(config, with_mtp=with_mtp)

    expected = model.state_dict()
    consumed: set[str] = set()
    missing: list[str] = []
    wrong_shape: list[str] = []
    state: dict[str, torch.Tensor] = {}
    bar = tqdm(expected.items(), desc="Loading weights", unit="tensor", disable=not progress, leave=False)
    for internal, meta in bar:
        target_dtype = torch.float32 if FLOAT32_PARAMS.match(internal) else dtype
        ckpt_name = checkpoint_prefix(internal, config)
        stack = EXPERT_STACK.match(ckpt_name)
        if ckpt_name in checkpoint:
            shape = checkpoint.shape(ckpt_name)
            if shape != list(meta.shape):
                wrong_shape.append(f"{ckpt_name} is {shape}, expected {list(meta.shape)}")
                continue
            tensor, names = checkpoint.weight(ckpt_name, target_dtype)
        elif stack:
            tensor, names, problems = _stack_experts(checkpoint, stack["prefix"], stack["kind"], meta, target_dtype)
            missing += problems["missing"]
            wrong_shape += problems["wrong_shape"]
            if tensor is None:
                continue
        else:
            missing.append(ckpt_name)
            continue
        consumed.update(names)
        state[internal] = tensor.to(device)

    unexpected = [
        n for n in checkpoint.names()
        if n not in consumed and not IGNORABLE.match(n) and not _is_skipped_mtp(n, config, with_mtp)
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors: {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_some(unexpected)}")
    if wrong_shape:
        problems.append(f"wrong shapes: {_some(wrong_shape)}")
    if problems:
        raise CheckpointError(f"cannot load {path}: " + "; ".join(problems))

    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    logger.info("loaded %s (%s, %s%s)", path, dtype, device, ", with MTP layer" if with_mtp else "")
    return model


def _is_skipped_mtp(name: str, config: ModelConfig, with_mtp: bool) -> bool:
    """MTP tensors are left out on purpose when the caller did not ask for them, and layers past the first
    MTP layer (checkpoints with several) are not used."""
    match = re.match(r"model\.layers\.(\d+)\.", name)
    if not match:
        return False
    layer = int(match.group(1))
    if layer == config.num_hidden_layers:
        return not with_mtp
    return config.num_hidden_layers < layer < config.num_hidden_layers + config.num_nextn_predict_layers


def _stack_experts(checkpoint: Checkpoint, prefix: str, kind: str, meta: torch.Tensor, dtype: torch.dtype):
    """Build a fused expert stack from per-expert tensors."""
    num_experts = meta.shape[0]
    parts = ("gate_proj", "up_proj") if kind == "gate_up_proj" else ("down_proj",)
    problems: dict[str, list[str]] = {"missing": [], "wrong_shape": []}
    part_shape = [meta.shape[1] // len(parts), meta.shape[2]]
    names = [f"{prefix}.{e}.{part}.weight" for e in range(num_experts) for part in parts]
    for name in names:
        if name not in checkpoint:
            problems["missing"].append(name)
        elif checkpoint.shape(name) != part_shape:
            problems["wrong_shape"].append(f"{name} is {checkpoint.shape(name)}, expected {part_shape}")
    if problems["missing"] or problems["wrong_shape"]:
        return None, [], problems
    stacked = torch.empty(list(meta.shape), dtype=dtype)
    consumed = []
    for i, name in enumerate(names):
        expert, part_index = divmod(i, len(parts))
        rows = slice(part_index * part_shape[0], (part_index + 1) * part_shape[0])
        tensor, used = checkpoint.weight(name, dtype)
        stacked[expert, rows] = tensor
        consumed += used
    return stacked, consumed, problems


# ---------------------------------------------------------------------- saving
def checkpoint_tensors(model) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's tensors under their released checkpoint names (per-expert, MTP as the last layer)."""
    config: ModelConfig = model.config
    for internal, tensor in model.state_dict().items():
        name = checkpoint_prefix(internal, config)
        stack = EXPERT_STACK.match(name)
        if not stack:
            yield name, tensor
            continue
        parts = ("gate_proj", "up_proj") if stack["kind"] == "gate_up_proj" else ("down_proj",)
        for expert in range(tensor.shape[0]):
            for part, piece in zip(parts, tensor[expert].chunk(len(parts), dim=0), strict=True):
                yield f"{stack['prefix']}.{expert}.{part}.weight", piece


def save_model(model, path: str | Path, max_shard_bytes: int = 4 << 30) -> None:
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config: ModelConfig = model.config
    hf_config = config.to_hf_dict()
    hf_config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    hf_config["num_nextn_predict_layers"] = config.num_nextn_predict_layers if model.mtp is not None else 0
    hf_config.pop("quantization_config", None)  # weights are written dequantised
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if config.eos_token_id:
        generation = {"eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id}
        (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    shard_bytes = 0
    for name, tensor in checkpoint_tensors(model):
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append((name, tensor))
        shard_bytes += size
    for stale in folder.glob("model*.safetensors*"):
        stale.unlink()
    if len(shards) == 1:
        file_names = ["model.safetensors"]
    else:
        file_names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    total = 0
    for file_name, shard in zip(file_names, shards, strict=True):
        # Per-expert pieces are views of a stack; safetensors wants each tensor to own its memory.
        tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in shard}
        save_file(tensors, str(folder / file_name), metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = file_name
            total += t.numel() * t.element_size()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
