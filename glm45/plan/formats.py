"""Byte rules of the weight formats and KV-cache dtypes, and the GPUs planned for."""

from __future__ import annotations

import math
from dataclasses import dataclass

GiB = 1 << 30
RESERVE_FRACTION = 0.05  # of the GPU's memory, left for activations (see engine.model_runner.kv_cache_blocks)
BLOCK_SIZE = 16          # tokens per KV-cache block (EngineConfig.block_size)
TP_SIZES = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class WeightFormat:
    """How a linear layer's weight [out, in] is stored: `bits` per weight, plus one scale (and one minimum)
    of `scale_bytes` per block of `block_rows` × `block_cols` weights; 0 means the whole dimension; and
    `super_bytes` per super-block of `super_blocks` blocks along a row (int4's fp16 pair over its 8-bit codes)."""

    name: str
    bits: int
    block_rows: int = 0
    block_cols: int = 0
    scale_bytes: int = 0
    min_bytes: int = 0
    super_blocks: int = 0
    super_bytes: int = 0
    strict_blocks: bool = False  # the input dimension must be a whole number of blocks (int8/int4 kernels)
    note: str = ""

    @property
    def quantized(self) -> bool:
        return self.bits < 16

    def nbytes(self, rows: int, cols: int) -> int:
        data = math.ceil(rows * cols * self.bits / 8)
        if not self.scale_bytes:
            return data
        row_blocks = math.ceil(rows / (self.block_rows or rows))
        col_blocks = math.ceil(cols / (self.block_cols or cols))
        supers = row_blocks * math.ceil(col_blocks / self.super_blocks) if self.super_blocks else 0
        return data + row_blocks * col_blocks * (self.scale_bytes + self.min_bytes) + supers * self.super_bytes

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
    # like llama.cpp's K-quants: 32 4-bit weights + 8-bit codes of a scale and a minimum, under an fp16 pair per
    # 8 blocks = 148 bytes per 256 weights
    WeightFormat("int4", 4, block_rows=1, block_cols=32, scale_bytes=1, min_bytes=1, super_blocks=8, super_bytes=4,
                 strict_blocks=True, note="4-bit in blocks of 32 along the input, 8-bit scale and minimum codes "
                 "under an fp16 pair per 8 blocks (148 bytes / 256)"),
)}
QUANTIZATIONS = ("auto", "bf16", "fp8", "int8", "int4")
KV_CACHE_DTYPES = {"fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}  # and "auto": the model's dtype


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
