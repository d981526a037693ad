"""glm45's CPU kernels, compiled on first use for the instruction set this CPU has, and their torch-side calls.

The C sources (`csrc/`) are built with the system C compiler into a per-user cache, once per source hash and
instruction set: AVX-512 (F, BW, VL, DQ, VNNI, BF16) when the CPU has all of those, else AVX2 + FMA + F16C.
`GLM45_CPU_ISA=avx2|avx512` forces one (tests run both where the CPU allows), and `GLM45_DISABLE_CPU_KERNELS=1`
turns the kernels off: torch's own ops are used then, as on CPUs without AVX2 or machines without a compiler.

Measured on the 2-core machine, and used here:
- 1–4 input rows (decoding): the kernels stream the weights once and widen them in registers (bf16, fp8) or
  dot quantized activations with them in integers (int8, int4) — about 2× torch's bf16 GEMV on a 151k × 1024
  head; for MoE experts one call covers all (row, expert) pairs;
- a bf16 model's rows on CPUs with AVX512-BF16 (the captured step's decoding, MTP verification and batches, and
  torch-side calls of up to 4 rows): bf16 dot products (vdpbf16ps, four weight rows by four activation rows a
  pass, or one weight row at a time for one or two long rows), from one row on, for the projections, the experts
  and the LM head; from GEMM_MIN_ROWS (32) rows of one matrix, the GEMM order over repacked panels of weight rows
  (csrc/gemv.c) — 1.1–1.4× the dot products at 64 rows;
- more rows in torch-side calls (prefill): a bf16 model's bf16 weights go through that GEMM on AVX512-BF16 CPUs,
  bf16 in and out (`lib_gemm_rows`; in one process a 64-request prefill ran 22–25% faster than with torch's bf16
  GEMM, whose small expert products were slowest), and so do packed weights, each panel dequantized to bf16 as it
  is packed; without those kernels, packed weights are dequantized to bf16 a few hundred rows at a time for
  torch's bf16 GEMM on CPUs with bf16 arithmetic, and on AVX2-only CPUs the weights are widened or dequantized to
  fp32 in such blocks, so the fp32 copy stays in cache, and torch's fp32 GEMM (MKL) does the rest — 3–8× torch's
  bf16 GEMM there (`native_bf16_gemm`).
The prefill's other kernels (RMSNorm, the routed experts in one call, causal attention) are in prefill.py.
Sampling (`sample`, `draw`: csrc/sample.c) takes the sampled rows of CPU logits: a vectorised pass per row instead of
a few dozen tensor operations (glm45/engine/sampler.py says when).
Autograd never goes through these paths (they are for inference only).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from functools import cache, lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

SOURCES = Path(__file__).with_name("csrc")
MAX_KERNEL_ROWS = 4
UPCAST_CHUNK_ROWS = 512
ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
               "-mavx512vnni", "-mavx512bf16"],
}
AVX512_FEATURES = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16")
FORMATS = {"f32": 0, "bf16": 1, "int8": 2, "int4": 3, "fp8": 4}
QBLOCK = 32
SAMPLE_SCRATCH = 5  # words per vocabulary entry the sampling kernel needs (csrc/sample.h)


class SampleRow(ctypes.Structure):
    """The C `SampleRow` (csrc/sample.c): one sampled row's parameters and uniform."""

    _fields_ = [("inv_temperature", ctypes.c_float), ("top_p", ctypes.c_float), ("min_p", ctypes.c_float),
                ("u", ctypes.c_float), ("top_k", ctypes.c_int64)]


class Weight(ctypes.Structure):
    """The C `Weight` descriptor (csrc/common.h)."""

    _fields_ = [("fmt", ctypes.c_int64), ("N", ctypes.c_int64), ("K", ctypes.c_int64),
                ("num_experts", ctypes.c_int64), ("fp8_block", ctypes.c_int64), ("data", ctypes.c_void_p),
                ("scale", ctypes.c_void_p), ("minimum", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("sub_scale", ctypes.c_void_p), ("sub_min", ctypes.c_void_p)]


def cpu_features() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def chosen_isa() -> str | None:
    """avx512, avx2, or None when the kernels cannot run here (or are turned off)."""
    if os.environ.get("GLM45_DISABLE_CPU_KERNELS") == "1":
        return None
    features = cpu_features()
    forced = os.environ.get("GLM45_CPU_ISA")
    if forced:
        if forced not in ISA_FLAGS:
            raise ValueError(f"GLM45_CPU_ISA={forced!r}: choose one of {sorted(ISA_FLAGS)}")
        return forced
    if all(f in features for f in AVX512_FEATURES):
        return "avx512"
    if {"avx2", "fma", "f16c"} <= features:
        return "avx2"
    return None


def _compile(isa: str) -> Path | None:
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        logger.info("no C compiler found: CPU linear layers use torch's kernels")
        return None
    sources = sorted(SOURCES.glob("*.c"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(SOURCES.glob("*.[ch]")))).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "glm45" / "kernels"
    target = cache / f"glm45_cpu-{isa}-{digest}.so"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        built = Path(tmp) / target.name
        command = [compiler, "-O3", *ISA_FLAGS[isa], "-fopenmp", "-shared", "-fPIC", "-I", str(SOURCES),
                   *map(str, sources), "-o", str(built), "-lm"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            logger.warning("could not compile the CPU kernels (%s); using torch's", result.stderr.strip()[:300])
            return None
        built.replace(target)  # atomic: concurrent processes never load a half-written file
    return target


@cache
def library(isa: str | None = None) -> ctypes.CDLL | None:
    """The compiled kernels for `isa` (default: the CPU's best), or None when they cannot run here."""
    isa = isa or chosen_isa()
    if isa is None:
        return None
    try:
        path = _compile(isa)
        if path is None:
            return None
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        logger.warning("CPU kernels unavailable (%s); using torch's", e)
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    w = ctypes.POINTER(Weight)
    lib.glm45_linear.argtypes = [w, p, i64, i64, p, i64, i32, i32]
    lib.glm45_grouped_linear.argtypes = [w, p, i64, i64, p, p, i64, i32, i32]
    lib.glm45_dequantize.argtypes = [w, i64, i64, i64, p, i32]
    lib.glm45_run_program.argtypes = [p, i64, i32, i32]
    lib.glm45_run_steps.argtypes = [p, i64, i64, p, p, i32, i32]
    lib.glm45_run_steps.restype = i64
    lib.glm45_attention_scratch.argtypes = [i64, i64]
    lib.glm45_attention_scratch.restype = i64
    lib.glm45_causal_attention.argtypes = [p, p, p, p, p, i64, i64, i64, i64, i64, ctypes.c_float, i32]
    lib.glm45_sample.argtypes = [p, i64, i64, i64, p, p, p, i64, p]
    lib.glm45_draw.argtypes = [p, i64, i64, i64, p, p]
    lib.glm45_argmax_rows.argtypes = [p, i64, i64, i64, p]
    lib.glm45_rms_norm_bf16.argtypes = [p, i64, i64, i64, p, ctypes.c_float, p, i64, i32]
    lib.glm45_isa.restype = ctypes.c_char_p
    lib.glm45_gemm_min_rows.restype = i64
    lib.gemm_min_rows = lib.glm45_gemm_min_rows()  # asked once: `linear` reads it on every call
    if lib.gemm_min_rows:
        lib.glm45_linear_bf16.argtypes = [w, p, i64, i64, p, i64, i32]
        lib.glm45_moe_bf16.argtypes = [w, w, p, i64, p, p, p, p, i64, i64, i32]
    logger.debug("CPU kernels: %s (%s)", path.name, lib.glm45_isa().decode())
    return lib


def lib_gemm_rows(lib: ctypes.CDLL | None) -> int:
    """The fewest rows of a bf16 model `linear` multiplies with the kernels' GEMM (AVX512-BF16 builds), else 0."""
    return 0 if lib is None else lib.gemm_min_rows


def available() -> bool:
    return library() is not None


@lru_cache(maxsize=1)
def native_bf16_gemm() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX), in which case torch's own bf16
    GEMM is the fast path for many rows: measured on such a CPU, 330–520 GFLOP/s against 16–48 for widening
    blocks to fp32 first, which is the right route only on CPUs without bf16 arithmetic (AVX2), where torch's
    bf16 GEMM runs at 6–10 GFLOP/s."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_features()) and os.environ.get("GLM45_CPU_ISA") != "avx2"


# ---------------------------------------------------------------------- weight descriptors
def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def describe(weight, bias: torch.Tensor | None = None) -> Weight | None:
    """The C descriptor of a weight: a contiguous f32/bf16 tensor [N, K] or [E, N, K], or a `PackedWeight`
    (glm45.quant); None when the kernels do not take it."""
    from glm45.quant.packed import PackedWeight

    if isinstance(weight, PackedWeight):
        experts, n, k = weight.num_experts, weight.out_features, weight.in_features
        return Weight(FORMATS[weight.format], n, k, experts, weight.block if weight.format == "fp8" else 0,
                      _ptr(weight.data), _ptr(weight.scale), _ptr(weight.minimum), _ptr(bias),
                      _ptr(weight.sub_scale), _ptr(weight.sub_min))
    if weight.dtype not in (torch.float32, torch.bfloat16) or not weight.is_contiguous() or weight.dim() not in (2, 3):
        return None
    n, k = weight.shape[-2:]
    experts = weight.shape[0] if weight.dim() == 3 else 1
    fmt = FORMATS["f32" if weight.dtype == torch.float32 else "bf16"]
    return Weight(fmt, n, k, experts, 0, weight.data_ptr(), None, None, _ptr(bias))


def at_inference(x: torch.Tensor, weight) -> bool:
    return x.device.type == "cpu" and not (torch.is_grad_enabled() and (x.requires_grad or
                                                                      getattr(weight, "requires_grad", False)))


def _rows_input(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()


# ---------------------------------------------------------------------- torch-facing calls
def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, faster on CPU at inference, for plain (f32/bf16) and packed (int8/int4/fp8) weights. The
    result has x's dtype (bf16 results rounded once, as torch rounds them)."""
    from glm45.quant.packed import PackedWeight

    packed = isinstance(weight, PackedWeight)
    if not at_inference(x, weight) or (not packed and weight.dtype != torch.bfloat16 and weight.dtype != x.dtype):
        return F.linear(x, weight.dequantize(x.dtype) if packed else weight, bias)
    lib = library() if x.device.type == "cpu" else None
    rows = x.numel() // x.shape[-1]
    out_features = weight.shape[-2]
    kernel_ok = lib is not None and weight.shape[-1] % QBLOCK == 0 and (packed or weight.is_contiguous())
    gemm_rows = lib_gemm_rows(lib)
    if (kernel_ok and x.dtype == torch.bfloat16 and gemm_rows and weight.shape[-1] % 2 == 0
            and (rows > MAX_KERNEL_ROWS if packed else weight.dtype == torch.bfloat16 and gemm_rows <= rows)):
        # many rows of a bf16 model (prefill, its experts): the kernels' GEMM, bf16 in and out (packed weights
        # dequantized to bf16 panel by panel)
        x2 = x.reshape(rows, x.shape[-1]).contiguous()
        y = torch.empty(rows, out_features, dtype=torch.bfloat16)
        bias32 = None if bias is None else bias.float().contiguous()
        lib.glm45_linear_bf16(ctypes.byref(describe(weight, bias32)), x2.data_ptr(), rows, x2.shape[-1],
                              y.data_ptr(), out_features, torch.get_num_threads())
        return y.view(*x.shape[:-1], out_features)
    if rows <= MAX_KERNEL_ROWS and kernel_ok and (packed or weight.dtype == torch.bfloat16):
        x32 = _rows_input(x)
        y = torch.empty(rows, out_features, dtype=torch.float32)
        bias32 = None if bias is None else bias.float().contiguous()
        lib.glm45_linear(ctypes.byref(describe(weight, bias32)), x32.data_ptr(), rows, x32.shape[-1], y.data_ptr(),
                         out_features, int(x.dtype == torch.bfloat16), torch.get_num_threads())
        return y.to(x.dtype).view(*x.shape[:-1], out_features)
    if not packed and weight.dtype == x.dtype and (x.dtype != torch.bfloat16 or native_bf16_gemm()):
        return F.linear(x, weight, bias)
    if packed and x.dtype == torch.bfloat16 and native_bf16_gemm():
        # Dequantize cache-sized blocks to bf16 and let torch's bf16 GEMM (AVX512-BF16/AMX) multiply.
        x2 = x.reshape(rows, x.shape[-1])
        y = torch.empty(rows, out_features, dtype=torch.bfloat16)
        for start in range(0, out_features, UPCAST_CHUNK_ROWS):
            stop = min(start + UPCAST_CHUNK_ROWS, out_features)
            torch.mm(x2, dequantize_rows(weight, 0, start, stop).to(torch.bfloat16).t(), out=y[:, start:stop])
        if bias is not None:
            y += bias
        return y.view(*x.shape[:-1], out_features)
    # Prefill and batched decode: widen/dequantize cache-sized blocks of rows, multiply in fp32 (MKL).
    x32 = x.reshape(rows, x.shape[-1]).float()
    y = torch.empty(rows, out_features, dtype=torch.float32)
    for start in range(0, out_features, UPCAST_CHUNK_ROWS):
        stop = min(start + UPCAST_CHUNK_ROWS, out_features)
        block = dequantize_rows(weight, 0, start, stop) if packed else weight[start:stop].float()
        torch.mm(x32, block.t(), out=y[:, start:stop])
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], out_features)


def grouped_linear(x: torch.Tensor, weight, expert_of_row: torch.Tensor) -> torch.Tensor | None:
    """y[r] = weight[expert_of_row[r]] @ x[r] for expert stacks [E, N, K] (plain bf16 or packed); None when the
    kernels do not apply (the caller then groups rows by expert)."""
    from glm45.quant.packed import PackedWeight

    packed = isinstance(weight, PackedWeight)
    lib = library() if x.device.type == "cpu" else None
    if lib is None or not at_inference(x, weight) or weight.shape[-1] % QBLOCK:
        return None
    if not packed and (weight.dtype != torch.bfloat16 or not weight.is_contiguous()):
        return None
    rows, out_features = x.shape[0], weight.shape[-2]
    x32 = _rows_input(x)
    experts = expert_of_row.to(torch.int64).contiguous()
    y = torch.empty(rows, out_features, dtype=torch.float32)
    lib.glm45_grouped_linear(ctypes.byref(describe(weight)), x32.data_ptr(), rows, x32.shape[-1], experts.data_ptr(),
                             y.data_ptr(), out_features, int(x.dtype == torch.bfloat16), torch.get_num_threads())
    return y.to(x.dtype)


def dequantize_rows(weight, expert: int, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of expert `expert` of a packed weight, as fp32 (kernels, or torch's reference)."""
    lib = library()
    if lib is None:
        return weight.dequantize_reference(expert, start, stop)
    out = torch.empty(stop - start, weight.in_features, dtype=torch.float32)
    lib.glm45_dequantize(ctypes.byref(describe(weight)), expert, start, stop, out.data_ptr(), torch.get_num_threads())
    return out


# ---------------------------------------------------------------------- sampling on the host
_scratch = threading.local()


def _sample_scratch(vocab: int) -> torch.Tensor:
    """Per thread, reused: the kernel's scratch (allocating it per call would fault in fresh pages)."""
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < SAMPLE_SCRATCH * vocab:
        buffer = _scratch.buffer = torch.empty(SAMPLE_SCRATCH * vocab, dtype=torch.float32)
    return buffer


def _rows_of(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    t = t if t.dtype == torch.float32 and t.stride(-1) == 1 else t.float().contiguous()
    return t, t.stride(0) if t.dim() == 2 and t.shape[0] > 1 else t.shape[-1]


def sample(logits: torch.Tensor, rows: list[tuple[float, float, float, float, int]], tokens: bool = True,
           probs: bool = False) -> tuple[list[int] | None, torch.Tensor | None]:
    """Rows of CPU logits [R, V] and, per row, `SampleRow`'s fields (1 / temperature, top_p, min_p, uniform, top_k
    (0: none)) → each row's drawn token and/or its distribution [R, V] (csrc/sample.c; the rules of
    glm45/engine/sampler.py's batched path). None when the kernels are not built here."""
    lib = library()
    if lib is None:
        return None, None
    x, ld = _rows_of(logits)
    count, vocab = x.shape
    table = (SampleRow * count)(*(SampleRow(*row) for row in rows))
    out = torch.empty(count, dtype=torch.int64) if tokens else None
    dist = torch.empty(count, vocab, dtype=torch.float32) if probs else None
    lib.glm45_sample(x.data_ptr(), ld, count, vocab, table, _ptr(out), _ptr(dist), vocab,
                     _sample_scratch(vocab).data_ptr())
    return (out.tolist() if tokens else None), dist


def draw(weights: torch.Tensor, u: list[float]) -> list[int] | None:
    """Rows of non-negative CPU weights [R, V] → per row the first column whose cumulative weight exceeds u · the
    row's total (`sampler.draw_rows`' rule); None when the kernels are not built here."""
    lib = library()
    if lib is None:
        return None
    x, ld = _rows_of(weights)
    out = torch.empty(x.shape[0], dtype=torch.int64)
    lib.glm45_draw(x.data_ptr(), ld, x.shape[0], x.shape[1], (ctypes.c_float * len(u))(*u), out.data_ptr())
    return out.tolist()
