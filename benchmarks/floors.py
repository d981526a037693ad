"""Machine floors for the benchmarks: the read bandwidth a batch-1 decode step can reach."""

from __future__ import annotations

import time

import torch

PROBE_BYTES = 512 << 20  # far beyond the caches


def read_bandwidth(threads: int, rounds: int = 5) -> float:
    """Bytes/s of streaming reads of 512 MiB with `threads` threads, best of `rounds`: the better of torch's sum over
    fp32 (the hardware prefetcher alone) and glm45's GEMV of one activation row over a bf16 matrix (which prefetches
    its weight rows ahead in software). On some machines the GEMV reads faster, and a floor from the sum alone let
    decode figures come out above 100% of it."""
    from glm45.kernels import cpu

    torch.set_num_threads(threads)
    buffer = torch.ones(PROBE_BYTES // 4)
    weight = torch.ones(PROBE_BYTES // 2 // 1024, 1024, dtype=torch.bfloat16)
    row = torch.ones(1, 1024)
    best = 0.0
    for probe, nbytes in ((buffer.sum, buffer.nbytes), (lambda: cpu.linear(row, weight), weight.nbytes)):
        probe()
        for _ in range(rounds):
            start = time.perf_counter()
            probe()
            best = max(best, nbytes / (time.perf_counter() - start))
    return best
