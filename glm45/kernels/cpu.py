"""Fast bf16 linear layers on CPU: a small AVX2 kernel for decode-sized inputs, fp32 upcasting for the rest.

On AVX2-only CPUs (no native bf16 arithmetic) torch's bf16 matmul runs at 6–10 GFLOP/s whatever the batch,
and its bf16 matrix-vector product reaches about half the memory bandwidth. Measured on the 2-core CI
machine, and used here:
- 1–4 input rows (decoding): `cpu_bf16.c` streams the bf16 weights once, widening in registers —
  about 2× torch on a 151k × 1024 head; for MoE experts one call covers all (row, expert) pairs;
- more rows (prefill, batched decode): the weights are widened to fp32 a few hundred rows at a time,
  so the fp32 copy stays in cache, and MKL's fp32 GEMM does the rest — 3–8× torch's bf16 GEMM.
The kernel is compiled with the system C compiler on first use into a per-user cache; without a
compiler, on other CPUs, or with GLM45_DISABLE_CPU_KERNELS=1, torch's own ops are used. Autograd never
goes through these paths (they are for inference only).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_bf16.c")
MAX_KERNEL_ROWS = 4
UPCAST_CHUNK_ROWS = 512


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    if os.environ.get("GLM45_DISABLE_CPU_KERNELS") == "1":
        return None
    if "avx2" not in torch.backends.cpu.get_cpu_capability().lower() and "avx512" not in (
        torch.backends.cpu.get_cpu_capability().lower()
    ):
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        logger.info("no C compiler found: bf16 CPU linear layers use torch's kernels")
        return None
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "glm45" / "kernels"
    target = cache / f"cpu_bf16-{digest}.so"
    try:
        if not target.is_file():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                built = Path(tmp) / target.name
                command = [compiler, "-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", str(SOURCE), "-o",
                           str(built)]
                result = subprocess.run(command, capture_output=True, text=True, timeout=120)
                if result.returncode != 0:
                    logger.warning("could not compile the CPU kernels (%s); using torch's",
                                   result.stderr.strip()[:200])
                    return None
                built.replace(target)  # atomic: concurrent processes never load a half-written file
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as e:
        logger.warning("CPU kernels unavailable (%s); using torch's", e)
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    library.gemv_bf16.argtypes = [pointer, pointer, pointer, pointer, size, size, size, ctypes.c_int]
    library.grouped_gemv_bf16.argtypes = [pointer, pointer, pointer, pointer, size, size, size, ctypes.c_int]
    return library


def _inference_bf16(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        weight.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, faster for bf16 weights on CPU at inference."""
    if not _inference_bf16(x, weight):
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    out_features, in_features = weight.shape
    if rows <= MAX_KERNEL_ROWS:
        library = _library()
        if library is None or in_features % 16 or x.dtype != torch.bfloat16 or not weight.is_contiguous():
            return F.linear(x, weight, bias)
        x = x.contiguous()
        y = torch.empty(*x.shape[:-1], out_features, dtype=torch.bfloat16)
        library.gemv_bf16(weight.data_ptr(), x.data_ptr(), 0 if bias is None else bias.contiguous().data_ptr(),
                          y.data_ptr(), rows, out_features, in_features, torch.get_num_threads())
        return y
    x32 = x.reshape(rows, in_features).float()
    y = torch.empty(rows, out_features, dtype=torch.float32)
    for start in range(0, out_features, UPCAST_CHUNK_ROWS):
        block = weight[start:start + UPCAST_CHUNK_ROWS]
        torch.mm(x32, block.float().t(), out=y[:, start:start + block.shape[0]])
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], out_features)


def grouped_gemv(x: torch.Tensor, weight: torch.Tensor, expert_of_row: torch.Tensor) -> torch.Tensor | None:
    """y[r] = weight[expert_of_row[r]] @ x[r] for bf16 expert stacks [E, N, K]; None when not applicable."""
    if not _inference_bf16(x, weight) or x.dtype != torch.bfloat16 or weight.shape[-1] % 16:
        return None
    library = _library()
    if library is None or not weight.is_contiguous():
        return None
    rows, (_, out_features, in_features) = x.shape[0], weight.shape
    x = x.contiguous()
    experts = expert_of_row.to(torch.int64).contiguous()
    y = torch.empty(rows, out_features, dtype=torch.bfloat16)
    library.grouped_gemv_bf16(weight.data_ptr(), x.data_ptr(), experts.data_ptr(), y.data_ptr(), rows,
                              out_features, in_features, torch.get_num_threads())
    return y
