"""Checkpoints: HF-layout safetensors folders ↔ `Glm4MoeForCausalLM`.

Loading builds the model on the meta device and assigns tensors read straight from memory-mapped files
(copy-on-write maps, so a tensor whose dtype already matches costs no copy and peak memory stays about
one copy of the weights). It accepts one `model.safetensors` or shards with `model.safetensors.index.json`,
per-expert tensors (the released layout) or fused expert stacks (transformers 5), and FP8 weights, which
it dequantises: every `X.weight` with a sibling `X.weight_scale` (per output channel, compressed-tensors)
or `X.weight_scale_inv` (128×128 blocks) becomes `W_fp8 · scale` in the requested dtype.

Any missing tensor, unexpected tensor, wrong shape or damaged file is an error that names it.

Tensor and expert parallelism hook in through `load_model(..., parallelize=fn)`: `fn` reshapes the meta
model to one rank's shard and returns a `ShardSpec` per sharded parameter; the loader then cuts each
memory-mapped tensor (and its FP8 scale) to that shard before copying, so no rank ever reads or holds the
whole model.

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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ShardSpec:
    """The part of a full tensor that one rank keeps.

    Along `dim` the tensor is `parts` equal blocks laid end to end (2 for a fused gate/up stack: gate rows,
    then up rows); each block is cut into `num_shards` equal pieces and the rank keeps piece `index` of every
    block, in block order. With parts=1 that is simply the index-th of num_shards equal slices.

    `pad` (one block only, for vocabularies that ranks do not divide): every piece is ⌈size / num_shards⌉
    long, the last ones are cut short by the end of the tensor and padded with zeros to that length.
    """

    dim: int
    num_shards: int
    index: int
    parts: int = 1
    pad: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.num_shards:
            raise ValueError(f"shard index {self.index} is outside [0, {self.num_shards})")
        if self.pad and self.parts != 1:
            raise ValueError("a padded shard has one block")

    def piece_length(self, size: int) -> int:
        return -(-size // self.num_shards) if self.pad else size // (self.parts * self.num_shards)

    def ranges(self, size: int) -> list[tuple[int, int]]:
        """(start, length) of each kept piece along `dim` of a full tensor that is `size` long there."""
        if self.pad:
            start = min(self.index * self.piece_length(size), size)
            return [(start, min(self.piece_length(size), size - start))]
        if size % (self.parts * self.num_shards):
            raise ValueError(f"a dimension of size {size} cannot be split into {self.parts} × {self.num_shards} "
                             "equal pieces")
        block = size // self.parts
        piece = block // self.num_shards
        return [(p * block + self.index * piece, piece) for p in range(self.parts)]

    def local_shape(self, full_shape: list[int] | torch.Size) -> list[int]:
        shape = list(full_shape)
        shape[self.dim] = self.piece_length(shape[self.dim]) * self.parts
        return shape

    def full_shape(self, local_shape: list[int] | torch.Size) -> list[int]:
        if self.pad:
            raise ValueError("the full shape of a padded shard is ambiguous")
        shape = list(local_shape)
        shape[self.dim] *= self.num_shards
        return shape

    def slice(self, tensor: torch.Tensor) -> torch.Tensor:
        """The kept part of a full tensor: a view when it is one whole piece, else a new tensor."""
        size = tensor.shape[self.dim]
        pieces = [tensor.narrow(self.dim, start, length) for start, length in self.ranges(size)]
        missing = self.piece_length(size) - pieces[0].shape[self.dim] if self.pad else 0
        if missing:
            shape = list(tensor.shape)
            shape[self.dim] = missing
            pieces.append(tensor.new_zeros(shape))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=self.dim)


ShardPlan = Mapping[str, ShardSpec]  # model parameter name → its shard on this rank


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

    def weight(self, name: str, dtype: torch.dtype, shard: ShardSpec | None = None) -> tuple[torch.Tensor, list[str]]:
        """The tensor `name` (or its `shard`) in `dtype`, dequantised if it has an FP8 scale; also the names it
        consumed. A shard is cut from the memory map before any conversion and owns its memory."""
        tensor = self.raw(name)
        for suffix in SCALE_SUFFIXES:
            scale_name = name + suffix
            if scale_name in self:
                if tensor.dtype not in FP8_DTYPES:
                    raise CheckpointError(f"{name} has a {scale_name} but is {tensor.dtype}, not an FP8 dtype")
                scale = self.raw(scale_name)
                if shard is None:
                    return dequantize_fp8(tensor, scale, name).to(dtype), [name, scale_name]
                return _dequantize_shard(tensor, scale, shard, name).to(dtype), [name, scale_name]
        if tensor.dtype in FP8_DTYPES:
            raise CheckpointError(f"{name} is stored in {tensor.dtype} but has no weight_scale/weight_scale_inv")
        if shard is None:
            return tensor.to(dtype), [name]
        piece = shard.slice(tensor)
        # A copy of the piece only: the rank must not keep a view that pins the whole tensor's pages.
        return piece.to(dtype, copy=piece.dtype == dtype, memory_format=torch.contiguous_format), [name]


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


def _dequantize_shard(weight: torch.Tensor, scale: torch.Tensor, shard: ShardSpec, name: str) -> torch.Tensor:
    """Dequantise only one rank's shard of an FP8 weight: cut the scale with the weight where it has a row
    (per channel) or a block (128×128) per piece of the shard; else dequantise the whole tensor and cut."""
    if scale.numel() == 1:
        return dequantize_fp8(shard.slice(weight), scale, name)
    per_channel = scale.numel() == weight.shape[0] and (scale.dim() == 1 or scale.shape[-1] == 1)
    if per_channel:
        if shard.dim == 0:
            return dequantize_fp8(shard.slice(weight), shard.slice(scale.reshape(-1, 1)), name)
        return dequantize_fp8(shard.slice(weight), scale, name)
    if scale.dim() == 2 and weight.dim() == 2:
        size = weight.shape[shard.dim]
        block = math.ceil(size / scale.shape[shard.dim])
        if all(start % block == 0 and length % block == 0 for start, length in shard.ranges(size)):
            return dequantize_fp8(shard.slice(weight), shard.slice(scale), name)
    logger.debug("%s: FP8 scale does not align with the shard; dequantising the whole tensor first", name)
    return shard.slice(dequantize_fp8(weight, scale, name)).contiguous()


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
    parallelize: Callable[[torch.nn.Module], ShardPlan] | None = None,
):
    """Build the model on the meta device and assign its tensors from the checkpoint.

    `parallelize(meta_model)` (tensor/expert parallelism) turns the model into this rank's shard and returns
    the `ShardSpec` of every parameter it cut; those parameters are read shard by shard."""
    from glm45.model.glm4_moe import Glm4MoeForCausalLM

    config = ModelConfig.from_pretrained(path)
    dtype = resolve_dtype(dtype, config)
    device = torch.device(device)
    checkpoint = Checkpoint(path)
    with_mtp = load_mtp and config.num_nextn_predict_layers > 0 and has_mtp_tensors(checkpoint, config)
    with torch.device("meta"):
        model = Glm4MoeForCausalLM(config, with_mtp=with_mtp)
    plan: ShardPlan = parallelize(model) if parallelize is not None else {}

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
        shard = plan.get(internal)
        if ckpt_name in checkpoint:
            shape = checkpoint.shape(ckpt_name)
            local_shape = shard.local_shape(shape) if shard else shape
            if local_shape != list(meta.shape):
                what = f"whose shard {shard} is {local_shape}" if shard else ""
                wrong_shape.append(f"{ckpt_name} is {shape}{what}, expected {list(meta.shape)}")
                continue
            tensor, names = checkpoint.weight(ckpt_name, target_dtype, shard)
        elif stack:
            tensor, names, problems = _stack_experts(checkpoint, stack["prefix"], stack["kind"], meta, target_dtype,
                                                     shard)
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


def _stack_experts(checkpoint: Checkpoint, prefix: str, kind: str, meta: torch.Tensor, dtype: torch.dtype,
                   shard: ShardSpec | None = None):
    """Build a fused expert stack (or one rank's shard of it) from per-expert tensors.

    A shard along dim 0 (expert parallelism) reads only this rank's experts; a shard along dim 1 or 2 (tensor
    parallelism inside each expert) cuts every expert's gate/up rows or down columns. The tensors of the
    experts other ranks hold are counted as consumed, not as unexpected."""
    full_shape = shard.full_shape(meta.shape) if shard else list(meta.shape)
    num_experts = full_shape[0]
    parts = ("gate_proj", "up_proj") if kind == "gate_up_proj" else ("down_proj",)
    problems: dict[str, list[str]] = {"missing": [], "wrong_shape": []}
    part_shape = [full_shape[1] // len(parts), full_shape[2]]
    experts = range(num_experts)
    part_shard = None
    if shard is not None and shard.dim == 0:
        (first, count), = shard.ranges(num_experts)
        experts = range(first, first + count)
    elif shard is not None:
        part_shard = ShardSpec(shard.dim - 1, shard.num_shards, shard.index)
    names = [f"{prefix}.{e}.{part}.weight" for e in experts for part in parts]
    for name in names:
        if name not in checkpoint:
            problems["missing"].append(name)
        elif checkpoint.shape(name) != part_shape:
            problems["wrong_shape"].append(f"{name} is {checkpoint.shape(name)}, expected {part_shape}")
    if problems["missing"] or problems["wrong_shape"]:
        return None, [], problems
    stacked = torch.empty(list(meta.shape), dtype=dtype)
    local_rows = meta.shape[1] // len(parts)
    consumed = []
    for i, name in enumerate(names):
        expert, part_index = divmod(i, len(parts))
        rows = slice(part_index * local_rows, (part_index + 1) * local_rows)
        tensor, used = checkpoint.weight(name, dtype, part_shard)
        stacked[expert, rows] = tensor
        consumed += used
    others = [f"{prefix}.{e}.{part}.weight{suffix}" for e in range(num_experts) if e not in experts
              for part in parts for suffix in ("", *SCALE_SUFFIXES)]
    consumed += [name for name in others if name in checkpoint]
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
