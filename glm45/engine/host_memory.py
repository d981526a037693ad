"""The process's C allocator once the engine is loaded: the load's freed temporaries go back to the system, and
later steps' temporaries are reused rather than mapped afresh each time.

glibc's malloc serves an allocation above its mmap threshold (128 KiB at first, raised as large blocks are freed,
at most 32 MiB) with new pages from the kernel, unmaps it when it is freed, and returns the heap's free top to the
kernel beyond a trim threshold. A step's tensors are mostly that size and short-lived (a prefill chunk's
activations are 1–32 MB), so every step paid for touching fresh pages again: on the 2-core machine a 64-request
batch's prefill of the `small` benchmark model took 4.1 s with glibc's defaults and 3.2 s with a fixed 32 MiB mmap
threshold and a 1 GiB trim threshold (what PyTorch's CPU guidance gets from jemalloc or tcmalloc). The cost is that
freed memory up to the trim threshold stays with the process, like the peak of the steps it served; trimming once
after loading keeps the load's own temporaries (quantizing, building the captured step) out of that. Elsewhere than
glibc nothing changes.

Large tables that start as zeros and fill as they are used (the KV cache) are mapped from the kernel's zero pages
(`lazily_zeroed`), so they become resident block by block as requests write them, not all at startup: on a CPU
the default 1 GiB cache otherwise costs a one-user server a gigabyte from the start."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import mmap
import os
from functools import cache

import numpy as np
import torch

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD = 1 << 30


@cache
def _glibc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.mallopt.argtypes, libc.malloc_trim.argtypes = [ctypes.c_int, ctypes.c_int], [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


def settle_host_allocator() -> bool:
    """Return what the load freed to the system, then keep step-sized blocks for reuse. True where it applied."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    applied = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD,
                                                                                   TRIM_THRESHOLD) == 1
    if not applied:
        logger.debug("mallopt refused the allocator settings; glibc's defaults stay")
    return applied


def lazily_zeroed(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled host tensor in a private anonymous mapping: its pages are the kernel's zero page until written
    (so reads of unwritten parts see zeros, and only the written pages are resident)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # The tensor keeps the mapping alive through the buffer it was made from.
    return torch.frombuffer(pages, dtype=torch.uint8).view(dtype).view(shape)


def resident_bytes(tensor: torch.Tensor) -> int | None:
    """How many bytes of a host tensor's memory are resident, counted page by page from /proc/self/pagemap (bit 63
    of a page's entry: present); None where that cannot be read (not Linux, not a host tensor). Reads 8 bytes per
    page (2 MiB for a 1 GiB tensor), counted as one array."""
    if tensor.device.type != "cpu" or not os.path.exists("/proc/self/pagemap"):
        return None
    page = mmap.PAGESIZE
    start, nbytes = tensor.data_ptr(), tensor.untyped_storage().nbytes()
    first, last = start // page, (start + max(nbytes, 1) - 1) // page
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(first * 8)
            raw = f.read((last - first + 1) * 8)
    except OSError:
        return None
    return int(np.count_nonzero(np.frombuffer(raw, dtype="<u8") >> np.uint64(63))) * page
