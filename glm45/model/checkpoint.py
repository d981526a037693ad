"""Reading checkpoint files: memory-mapped safetensors (one file or shards with an index) and FP8 scales.

A `Checkpoint` gives every tensor of a folder by its stored name, as a zero-copy view of a copy-on-write
memory map, so a tensor whose dtype already matches costs no copy. `Checkpoint.weight` applies an FP8 weight's
scale: every `X.weight` with a sibling `X.weight_scale` (per output channel, compressed-tensors) or
`X.weight_scale_inv` (128×128 blocks) becomes `W_fp8 · scale`. What the stored names mean for the model is
`state_dict.py`'s business.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import struct
from pathlib import Path

import torch

from glm45.model.shard import ShardSpec
from glm45.quant.packed import STORED_SUFFIXES, PackedWeight, fp8_block_weight

logger = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_SUFFIXES = ("_scale", "_scale_inv")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: what is wrong and which tensors or files are concerned."""


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
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
                raise CheckpointError(f"{path} has a corrupt safetensors header: {e}") from e
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 0 else None
        self.data_start = 8 + header_len
        self.entries = check_header(path, header, size - self.data_start)

    def shape(self, name: str) -> list[int]:
        return self.entries[name][1]

    def release_pages(self) -> None:
        """Drop the map's pages from this process (they stay in the page cache, and come back on the next read):
        views of the map stay valid."""
        if self.map is not None and hasattr(self.map, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            self.map.madvise(mmap.MADV_DONTNEED)

    def release_tensor_pages(self, name: str) -> None:
        """Drop the pages that lie wholly inside tensor `name` (as `release_pages` does for the whole map)."""
        if self.map is None or not hasattr(self.map, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        _, _, begin, end = self.entries[name]
        first = -(-(self.data_start + begin) // mmap.PAGESIZE) * mmap.PAGESIZE
        last = (self.data_start + end) // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            self.map.madvise(mmap.MADV_DONTNEED, first, last - first)

    def get(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[name]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(self.map, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                offset=self.data_start + begin)
        return flat.view(shape)


def check_header(path: Path, header: object, data_size: int) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
    """The tensors a safetensors header describes, {name: (dtype, shape, begin, end)}, after checking that it is a
    JSON object of well-formed entries whose data lie inside the file's data section, do not overlap, and have
    exactly dtype size × ∏ shape bytes. A header that fails any check is a `CheckpointError`: a hostile file
    could otherwise have the header (or another tensor) read as weights."""
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header must be a JSON object, got {type(header).__name__}")
    entries: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype")) if isinstance(info, dict) else None
        shape, offsets = (info.get("shape"), info.get("data_offsets")) if isinstance(info, dict) else (None, None)
        if (dtype is None or not isinstance(shape, list) or not all(_is_count(s) for s in shape)
                or not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets)):
            raise CheckpointError(f"{path}: tensor {name!r} has an unreadable header entry {info!r:.200} (needs a "
                                  f"dtype of {sorted(SAFETENSORS_DTYPES)}, a shape and two data_offsets ≥ 0)")
        begin, end = offsets
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected:
            raise CheckpointError(
                f"{path}: tensor {name!r} has {end - begin} bytes of data for shape {shape} ({expected} expected)"
            )
        if end > data_size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name!r} ends at byte {end} of the data section, "
                f"which has only {data_size} bytes"
            )
        entries[name] = (dtype, shape, begin, end)
    spans = sorted((begin, end, name) for name, (_, _, begin, end) in entries.items() if end > begin)
    for (_, end, name), (begin, _, other) in zip(spans, spans[1:], strict=False):
        if begin < end:
            raise CheckpointError(f"{path}: the data of tensors {name!r} and {other!r} overlap")
    return entries


def read_index(index_file: Path) -> dict[str, str]:
    """The weight map of a `model.safetensors.index.json`: tensor name → a file name in the same folder."""
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{index_file} is not a valid safetensors index: {e}") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) and v and Path(v).name == v and v not in (".", "..") for v in weight_map.values()):
        raise CheckpointError(f"{index_file} is not a valid safetensors index: it needs a \"weight_map\" object of "
                              "tensor name → file name in the same folder")
    return weight_map


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class Checkpoint:
    """All tensors of a checkpoint folder, by name, whichever file holds them."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
        index_file = self.folder / "model.safetensors.index.json"
        if index_file.is_file():
            weight_map = read_index(index_file)
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
            raise CheckpointError(f"the index lists tensors that are not in their files: {some_names(absent)}")

    def __contains__(self, name: str) -> bool:
        return name in self.location

    def release_pages(self) -> None:
        """Drop every file's mapped pages from this process (after a load that copied or packed what it keeps)."""
        for file in self.files.values():
            file.release_pages()

    def release_tensor_pages(self, name: str) -> None:
        """Drop the mapped pages of tensor `name` from this process (after reading it only to compare it)."""
        self.location[name].release_tensor_pages(name)

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
                return dequantize_fp8_shard(tensor, scale, shard, name).to(dtype), [name, scale_name]
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
    if w.dim() == 3 and s.numel() == w.shape[0] * w.shape[1]:  # a fused expert stack with per-row scales
        return w * s.reshape(*w.shape[:2], 1)
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


def dequantize_fp8_shard(weight: torch.Tensor, scale: torch.Tensor, shard: ShardSpec, name: str) -> torch.Tensor:
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


def some_names(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" … and {len(names) - limit} more" if len(names) > limit else "")


# ---------------------------------------------------------------------- packed (quantized) weights
def stored_packed(checkpoint: Checkpoint, name: str, stored: str) -> tuple[PackedWeight, list[str]] | None:
    """The tensor `name` as the checkpoint stores it, when it is packed (with its scale): FP8 per channel
    (`weight_scale`) or per block (`weight_scale_inv`), or glm45's int8/int4 (`_scale`, int4 also `_min` and, in
    super-blocks, `_sub_scale` and `_sub_min`)."""
    for suffix in ("_scale", "_scale_inv"):
        if name + suffix not in checkpoint:
            continue
        data, scale = checkpoint.raw(name), checkpoint.raw(name + suffix)
        names = [name, name + suffix]
        if data.dtype in FP8_DTYPES:
            if suffix == "_scale_inv" or (scale.dim() >= 2 and scale.shape[-1] > 1 and stored == "fp8_block"):
                return fp8_block_weight(data, scale), names
            per_row = scale.float().reshape(*data.shape[:-1]) if scale.numel() > 1 else \
                scale.float().reshape(()).expand(data.shape[:-1]).contiguous()
            return PackedWeight("fp8", data, per_row.contiguous()), names
        if stored in ("int8", "int4"):
            extra = {}
            if stored == "int4":
                if name + "_min" not in checkpoint:
                    raise CheckpointError(f"{name} is int4 but has no {name}_min")
                codes = ["sub_scale", "sub_min"]
                present = [name + STORED_SUFFIXES[field] in checkpoint for field in codes]
                if any(present) and not all(present):
                    raise CheckpointError(f"{name} is int4 in super-blocks but lacks one of {name}_sub_scale, "
                                          f"{name}_sub_min")
                fields = ["minimum", *(codes if all(present) else [])]
                extra = {field: checkpoint.raw(name + STORED_SUFFIXES[field]) for field in fields}
                names += [name + STORED_SUFFIXES[field] for field in fields]
            return PackedWeight(stored, data, scale, **extra), names
    return None


def stack_stored_packed(checkpoint: Checkpoint, prefix: str, kind: str, num_experts: int,
                        stored: str) -> tuple[PackedWeight, list[str]] | None:
    """An FP8 checkpoint's per-expert weights stacked as one packed [E, N, K] weight, without dequantizing."""
    parts = ("gate_proj", "up_proj") if kind == "gate_up_proj" else ("down_proj",)
    pieces, names = [], []
    for expert in range(num_experts):
        loaded = [stored_packed(checkpoint, f"{prefix}.{expert}.{part}.weight", stored) for part in parts]
        if any(item is None for item in loaded):
            return None
        for _, consumed in loaded:
            names += consumed
        packed = [p for p, _ in loaded]
        if len({p.block for p in packed}) != 1:
            return None
        if packed[0].block and packed[0].out_features % packed[0].block:
            return None  # gate and up rows would share a scale block
        pieces.append(PackedWeight("fp8", torch.cat([p.data for p in packed]), torch.cat([p.scale for p in packed]),
                                   None, packed[0].block))
    first = pieces[0]
    return PackedWeight("fp8", torch.stack([p.data for p in pieces]), torch.stack([p.scale for p in pieces]), None,
                        first.block), names
