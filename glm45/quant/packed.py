"""Weights kept in a quantized format (`PackedWeight`), and the torch reference quantizers and dequantizers.

    int8  blocks of 32 along the input dimension, one fp16 scale each: w = d · q, q in -127..127 (llama.cpp's
          Q8_0 layout; 34 bytes per 32 weights).
    int4  blocks of 32, each with a scale and a minimum: w = d · q + m, q in 0..15, two per byte (byte j of a
          block: element j in the low nibble, element j + 16 in the high one). The scale and minimum of each
          block are fitted by least squares, not just its range (see `quantize_int4`), which lowers the error a
          plain min/max rounding leaves by about a fifth. They are stored as in llama.cpp's K-quants: super-blocks
          of 8 blocks (256 weights; a row's last one may hold fewer) carry an fp16 D and M, and each block an
          8-bit code of its scale (d = D · sc, sc in 0..255) and minimum (m = M · mn, mn in -127..127): 18.5
          bytes per 32 weights (4.625 bits a weight). On the bundled model that gave 7.5% fewer bytes than an
          fp16 scale and minimum per block (20 bytes, the layout of checkpoints glm45 wrote before, which it still
          reads: `sub_scale` None) for 3% more KL divergence from float32 (benchmarks/bench_quality.py).
    fp8   float8_e4m3fn with an fp32 scale per output row (compressed-tensors) or per 128×128 block
          (`weight_scale_inv` checkpoints): w = q · scale.
Stacks of experts carry a leading expert dimension on every tensor. The CPU kernels read these layouts as
they are (csrc/gemv.c); these torch functions are the reference the kernels are tested against.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

QBLOCK = 32
SUPER_BLOCKS = 8  # int4: blocks of 32 that share one fp16 scale and minimum for their 8-bit codes
FP8_MAX = 448.0
FORMATS = ("int8", "int4", "fp8")


@dataclass
class PackedWeight:
    format: str                          # int8 | int4 | fp8
    data: torch.Tensor                   # int8 [.., N, K] | uint8 [.., N, K/2] | float8_e4m3fn [.., N, K]
    scale: torch.Tensor                  # int8: fp16 [.., N, K/32] | int4: fp16 D [.., N, ⌈K/256⌉] (per block
                                         # [.., N, K/32] without codes) | fp8: fp32 [.., N] or [.., ⌈N/b⌉, ⌈K/b⌉]
    minimum: torch.Tensor | None = None  # int4: fp16 M, shaped as its scale
    block: int = 0                       # fp8: 0 (per row) or the square block of its scales
    sub_scale: torch.Tensor | None = None  # int4: uint8 codes [.., N, K/32] (d = D · sc); None: per-block fp16
    sub_min: torch.Tensor | None = None    # int4: int8 codes [.., N, K/32] (m = M · mn)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f: getattr(self, f) for f in TENSOR_FIELDS if getattr(self, f) is not None}

    def map(self, fn) -> PackedWeight:
        """The same weight with `fn` applied to each of its tensors (a slice, a copy to a device, …)."""
        return dataclasses.replace(self, **{f: fn(t) for f, t in self.tensors().items()})

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
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def __getitem__(self, expert: int) -> PackedWeight:
        """One expert of a stack (views, no copy)."""
        return self.map(lambda t: t[expert])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole weight (or stack) in `dtype` (torch reference arithmetic)."""
        return dequantize(self).to(dtype)

    def dequantize_reference(self, expert: int, start: int, stop: int) -> torch.Tensor:
        one = self[expert] if self.data.dim() == 3 else self
        if one.format == "fp8" and one.block:
            return dequantize(one)[start:stop]
        return dequantize(one.map(lambda t: t[start:stop]))


TENSOR_FIELDS = ("data", "scale", "minimum", "sub_scale", "sub_min")
# The name each tensor is stored under, after the weight's own name (`X.weight`, `X.weight_scale`, …): module
# buffers and glm45's quantized checkpoints alike.
STORED_SUFFIXES = {"data": "", "scale": "_scale", "minimum": "_min", "sub_scale": "_sub_scale", "sub_min": "_sub_min"}


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
    least-squares refit of scale and minimum (rounded to fp16), keeping the best error seen; then code the scales
    and minimums in super-blocks and round the codes again to the coded values. Works through the rows in chunks,
    so a large stack needs only a slice of fp32 memory at a time."""
    *lead, n, k = w.shape
    nb = k // QBLOCK
    groups = -(-nb // SUPER_BLOCKS)
    codes = torch.empty(*lead, n, k // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(*lead, n, groups, dtype=torch.float16, device=w.device)
    minimums = torch.empty(*lead, n, groups, dtype=torch.float16, device=w.device)
    sub_scales = torch.empty(*lead, n, nb, dtype=torch.uint8, device=w.device)
    sub_mins = torch.empty(*lead, n, nb, dtype=torch.int8, device=w.device)
    flat_codes, flat_scales, flat_minimums = codes.view(-1, k // 2), scales.view(-1, groups), minimums.view(-1, groups)
    flat_sub_scales, flat_sub_mins = sub_scales.view(-1, nb), sub_mins.view(-1, nb)
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
        _, scale, minimum = best
        d, m, sc, mn = _super_block_codes(scale, minimum)
        flat_scales[start:stop], flat_minimums[start:stop] = d, m
        flat_sub_scales[start:stop], flat_sub_mins[start:stop] = sc, mn
        block_scale, block_min = _expand_codes(d.float(), m.float(), sc, mn)
        q = _int4_codes(blocks, block_scale, block_min).to(torch.uint8)  # re-rounded to the coded scales
        flat_codes[start:stop] = (q[..., :QBLOCK // 2] | (q[..., QBLOCK // 2:] << 4)).reshape(-1, k // 2)
    return PackedWeight("int4", codes, scales, minimums, sub_scale=sub_scales, sub_min=sub_mins)


def _super_block_codes(scale: torch.Tensor, minimum: torch.Tensor):
    """Per-block scales and minimums [R, B] → fp16 D, M per super-block [R, ⌈B/8⌉] and 8-bit codes [R, B]."""
    rows, nb = scale.shape
    groups = -(-nb // SUPER_BLOCKS)
    pad = groups * SUPER_BLOCKS - nb
    grouped_scale = torch.nn.functional.pad(scale, (0, pad)).view(rows, groups, SUPER_BLOCKS)
    grouped_min = torch.nn.functional.pad(minimum, (0, pad)).view(rows, groups, SUPER_BLOCKS)
    d = (grouped_scale.amax(-1) / 255).to(torch.float16)
    m = (grouped_min.abs().amax(-1) / 127).to(torch.float16)
    d32, m32 = d.float(), m.float()
    sc = torch.round(grouped_scale / torch.where(d32 > 0, d32, 1.0)[..., None]).clamp_(0, 255)
    mn = torch.round(grouped_min / torch.where(m32 > 0, m32, 1.0)[..., None]).clamp_(-127, 127)
    return (d, m, sc.view(rows, -1)[:, :nb].to(torch.uint8), mn.view(rows, -1)[:, :nb].to(torch.int8))


def _expand_codes(d: torch.Tensor, m: torch.Tensor, sc: torch.Tensor, mn: torch.Tensor):
    """Each block's scale and minimum (fp32) from its super-block's D, M [.., ⌈B/8⌉] and its codes [.., B]."""
    nb = sc.shape[-1]
    d = d.repeat_interleave(SUPER_BLOCKS, -1)[..., :nb]
    m = m.repeat_interleave(SUPER_BLOCKS, -1)[..., :nb]
    return d * sc.float(), m * mn.float()


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
        scale, minimum = p.scale.float(), p.minimum.float()
        if p.sub_scale is not None:
            scale, minimum = _expand_codes(scale, minimum, p.sub_scale, p.sub_min)
        packed = p.data.reshape(*scale.shape, QBLOCK // 2)
        q = torch.cat([packed & 0x0F, packed >> 4], dim=-1).float()
        return (q * scale[..., None] + minimum[..., None]).reshape(p.shape)
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
