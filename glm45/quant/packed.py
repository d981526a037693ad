"""Weights kept in a quantized format (`PackedWeight`), and the torch reference quantizers and dequantizers.

    int8  blocks of 32 along the input dimension, one fp16 scale each: w = d · q, q in -127..127 (llama.cpp's
          Q8_0 layout; 34 bytes per 32 weights).
    int4  blocks of 32, an fp16 scale and an fp16 minimum each: w = d · q + m, q in 0..15, two per byte (byte j
          of a block: element j in the low nibble, element j + 16 in the high one; 20 bytes per 32 weights).
          The scale and minimum of each block are fitted by least squares, not just its range (see
          `quantize_int4`), which lowers the error a plain min/max rounding leaves by about a fifth.
    fp8   float8_e4m3fn with an fp32 scale per output row (compressed-tensors) or per 128×128 block
          (`weight_scale_inv` checkpoints): w = q · scale.
Stacks of experts carry a leading expert dimension on every tensor. The CPU kernels read these layouts as
they are (csrc/gemv.c); these torch functions are the reference the kernels are tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

QBLOCK = 32
FP8_MAX = 448.0
FORMATS = ("int8", "int4", "fp8")


@dataclass
class PackedWeight:
    format: str                          # int8 | int4 | fp8
    data: torch.Tensor                   # int8 [.., N, K] | uint8 [.., N, K/2] | float8_e4m3fn [.., N, K]
    scale: torch.Tensor                  # fp16 [.., N, K/32] | fp32 [.., N] or [.., ⌈N/b⌉, ⌈K/b⌉]
    minimum: torch.Tensor | None = None  # int4: fp16 [.., N, K/32]
    block: int = 0                       # fp8: 0 (per row) or the square block of its scales

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, n, k = self.data.shape
        return (*lead, n, k * 2 if self.format == "int4" else k)

    @property
    def num_experts(self) -> int:
        return self.data.shape[0] if self.data.dim() == 3 else 1

    @property
    def out_features(self) -> int:
        return self.shape[-2]

    @property
    def in_features(self) -> int:
        return self.shape[-1]

    @property
    def requires_grad(self) -> bool:
        return False

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.minimum) if t is not None)

    def __getitem__(self, expert: int) -> PackedWeight:
        """One expert of a stack (views, no copy)."""
        return PackedWeight(self.format, self.data[expert], self.scale[expert],
                            None if self.minimum is None else self.minimum[expert], self.block)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole weight (or stack) in `dtype` (torch reference arithmetic)."""
        return dequantize(self).to(dtype)

    def dequantize_reference(self, expert: int, start: int, stop: int) -> torch.Tensor:
        one = self[expert] if self.data.dim() == 3 else self
        if one.format == "fp8" and one.block:
            return dequantize(one)[start:stop]
        rows = PackedWeight(one.format, one.data[start:stop], one.scale[start:stop],
                            None if one.minimum is None else one.minimum[start:stop], one.block)
        return dequantize(rows)


# ---------------------------------------------------------------------- quantizers
def _blocks(w: torch.Tensor) -> torch.Tensor:
    *lead, k = w.shape
    if k % QBLOCK:
        raise ValueError(f"an input dimension of {k} is not a whole number of blocks of {QBLOCK}")
    return w.float().reshape(*lead, k // QBLOCK, QBLOCK)


CHUNK_VALUES = 1 << 24  # per quantizer pass: 64 MB float32 temporaries


def _row_chunks(w: torch.Tensor):
    """(start, stop, rows) of a weight flattened to rows, about CHUNK_VALUES values at a time: a quantizer's float32
    temporaries take a slice of memory, not copies of the whole (a 151,552 × 5,120 embedding), and each is above
    glibc's largest mmap threshold (32 MB), so it goes back to the system when freed instead of fragmenting the
    heap that the packed weights live beside. The packed outputs are allocated whole up front."""
    flat = w.reshape(-1, w.shape[-1])
    step = max(1, CHUNK_VALUES // w.shape[-1])
    for start in range(0, flat.shape[0], step):
        yield start, start + step, flat[start:start + step]


def quantize_int8(w: torch.Tensor) -> PackedWeight:
    *lead, n, k = w.shape
    codes = torch.empty(*lead, n, k, dtype=torch.int8, device=w.device)
    scales = torch.empty(*lead, n, k // QBLOCK, dtype=torch.float16, device=w.device)
    flat_codes, flat_scales = codes.view(-1, k), scales.view(-1, k // QBLOCK)
    for start, stop, rows in _row_chunks(w):
        blocks = _blocks(rows)
        scale = (blocks.abs().amax(-1) / 127.0).to(torch.float16)
        inverse = torch.where(scale > 0, 1.0 / scale.float(), torch.zeros_like(scale, dtype=torch.float32))
        flat_codes[start:stop] = torch.round(blocks * inverse[..., None]).clamp_(-127, 127).reshape(-1, k)
        flat_scales[start:stop] = scale
    return PackedWeight("int8", codes, scales)


def _int4_codes(blocks: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    return torch.round((blocks - minimum[..., None]) * inverse[..., None]).clamp_(0, 15)


def _fit(blocks: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares (scale, minimum) for fixed codes q: minimise Σ (d·q + m − x)² per block."""
    n = blocks.shape[-1]
    sq, sx = q.sum(-1), blocks.sum(-1)
    sqq, sqx = (q * q).sum(-1), (q * blocks).sum(-1)
    det = n * sqq - sq * sq
    safe = det > 0
    scale = torch.where(safe, (n * sqx - sq * sx) / torch.where(safe, det, 1.0), torch.zeros_like(det))
    minimum = torch.where(safe, (sx - scale * sq) / n, sx / n)
    return scale, minimum


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).float()


def quantize_int4(w: torch.Tensor, iterations: int = 3) -> PackedWeight:
    """Per block of 32: start from the range (min, (max − min) / 15), then alternate rounding the codes and a
    least-squares refit of scale and minimum (rounded to fp16 as stored), keeping the best error seen.
    Works through the rows in chunks, so a large stack needs only a slice of fp32 memory at a time."""
    *lead, n, k = w.shape
    codes = torch.empty(*lead, n, k // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(*lead, n, k // QBLOCK, dtype=torch.float16, device=w.device)
    minimums = torch.empty(*lead, n, k // QBLOCK, dtype=torch.float16, device=w.device)
    flat_codes, flat_scales = codes.view(-1, k // 2), scales.view(-1, k // QBLOCK)
    flat_minimums = minimums.view(-1, k // QBLOCK)
    for start, stop, rows in _row_chunks(w):
        blocks = _blocks(rows)
        low, high = blocks.amin(-1), blocks.amax(-1)
        scale, minimum = _fp16((high - low) / 15.0), _fp16(low)
        q = _int4_codes(blocks, scale, minimum)
        best_err = ((scale[..., None] * q + minimum[..., None] - blocks) ** 2).sum(-1)
        best = (q, scale, minimum)
        for _ in range(iterations):
            scale, minimum = _fit(blocks, q)
            scale, minimum = _fp16(scale.clamp(min=0)), _fp16(minimum)
            q = _int4_codes(blocks, scale, minimum)
            err = ((scale[..., None] * q + minimum[..., None] - blocks) ** 2).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = (torch.where(better[..., None], q, best[0]), torch.where(better, scale, best[1]),
                    torch.where(better, minimum, best[2]))
        q, scale, minimum = best
        q = q.to(torch.uint8)
        flat_codes[start:stop] = (q[..., :QBLOCK // 2] | (q[..., QBLOCK // 2:] << 4)).reshape(-1, k // 2)
        flat_scales[start:stop] = scale
        flat_minimums[start:stop] = minimum
    return PackedWeight("int4", codes, scales, minimums)


def quantize_fp8(w: torch.Tensor) -> PackedWeight:
    """e4m3 with one fp32 scale per output row (the compressed-tensors layout of GLM-4.5's FP8 releases)."""
    codes = torch.empty(w.shape, dtype=torch.float8_e4m3fn, device=w.device)
    scales = torch.empty(w.shape[:-1], dtype=torch.float32, device=w.device)
    flat_codes, flat_scales = codes.view(-1, w.shape[-1]), scales.view(-1)
    for start, stop, rows in _row_chunks(w):
        w32 = rows.float()
        scale = (w32.abs().amax(-1) / FP8_MAX).clamp(min=1e-12)
        flat_codes[start:stop] = (w32 / scale[..., None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        flat_scales[start:stop] = scale
    return PackedWeight("fp8", codes, scales)


def quantize(w: torch.Tensor, fmt: str) -> PackedWeight:
    if fmt == "int8":
        return quantize_int8(w)
    if fmt == "int4":
        return quantize_int4(w)
    if fmt == "fp8":
        return quantize_fp8(w)
    raise ValueError(f"unknown weight format {fmt!r}; supported: {', '.join(FORMATS)}")


# ---------------------------------------------------------------------- dequantizers (reference)
def dequantize(p: PackedWeight) -> torch.Tensor:
    if p.format == "int8":
        blocks = p.data.float().reshape(*p.scale.shape, QBLOCK)
        return (blocks * p.scale.float()[..., None]).reshape(p.shape)
    if p.format == "int4":
        packed = p.data.reshape(*p.scale.shape, QBLOCK // 2)
        q = torch.cat([packed & 0x0F, packed >> 4], dim=-1).float()
        return (q * p.scale.float()[..., None] + p.minimum.float()[..., None]).reshape(p.shape)
    if p.format == "fp8":
        w = p.data.float()
        if p.block == 0:
            return w * p.scale.float()[..., None]
        n, k = w.shape[-2:]
        b = p.block
        scale = p.scale.float().repeat_interleave(b, -2)[..., :n, :].repeat_interleave(b, -1)[..., :k]
        return w * scale
    raise ValueError(f"unknown weight format {p.format!r}")


def fp8_block_weight(data: torch.Tensor, scale_inv: torch.Tensor) -> PackedWeight:
    """An FP8 checkpoint's weight with 2-D block scales (`weight_scale_inv` [⌈N/b⌉, ⌈K/b⌉], a multiplier)."""
    n, k = data.shape[-2:]
    rows, cols = scale_inv.shape[-2:]
    # The block size is 128 in every release; a small weight (one block) fits several sizes.
    for block in (128, 64, 256, 32, 512, math.ceil(n / rows)):
        if math.ceil(n / block) == rows and math.ceil(k / block) == cols:
            return PackedWeight("fp8", data, scale_inv.float(), None, block)
    raise ValueError(f"FP8 block scales {list(scale_inv.shape)} do not tile a weight {list(data.shape)} in square "
                     "blocks")
