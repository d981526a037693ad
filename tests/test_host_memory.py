"""The engine's host-allocator settings: step-sized blocks freed by one step are reused by the next, not mapped
afresh (which cost every prefill its first-touch page faults)."""

import subprocess
import sys

import pytest

from glm45.engine.host_memory import _glibc

# A "step": tensors of 1–24 MB, a few alive at a time, then all freed; the page faults of each of 8 steps.
PROBE = """
import resource, sys, torch
from glm45.engine.host_memory import settle_host_allocator
if sys.argv[1] == "settled":
    assert settle_host_allocator()
def step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    live = []
    for mb in (8, 2, 16, 4, 24, 1):
        t = torch.empty(mb << 18, dtype=torch.float32)
        t.fill_(1.0)
        live.append(t)
        if len(live) > 2:
            live.pop(0)
    del live
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print([step() for _ in range(8)])
"""


@pytest.mark.skipif(_glibc() is None, reason="the settings are glibc's (mallopt); this C library has none")
def test_steps_after_the_first_two_reuse_the_heap_without_page_faults():
    # A step touches 55 MB (about 14,000 pages of 4 KiB). With glibc's defaults the steps after the first fault
    # again in most runs (its mmap threshold moves with what is freed); settled, the heap keeps the pages.
    out = subprocess.run([sys.executable, "-c", PROBE, "settled"], capture_output=True, text=True, check=True)
    faults = [int(v) for v in out.stdout.strip().splitlines()[-1].strip("[]").split(",")]
    assert faults[0] > 5000, faults  # the first step touches its pages
    assert max(faults[2:]) < 200, faults
