"""The engine's host memory: step-sized blocks freed by one step are reused by the next, not mapped afresh (which
cost every prefill its first-touch page faults), and the KV cache becomes resident as it is written."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_checkpoints import save_reference

from glm45 import SamplingParams
from glm45.config import EngineConfig
from glm45.engine import LLMEngine
from glm45.engine.host_memory import _glibc, lazily_zeroed, resident_bytes

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


@pytest.mark.skipif(not Path("/proc/self/pagemap").exists(), reason="reads /proc/self/pagemap (Linux)")
def test_the_kv_cache_becomes_resident_as_requests_write_it(tmp_path):
    """A 256 MiB host KV cache costs nothing at startup; a request makes its own blocks resident, not the rest, and
    the engine's output is the same as with a cache that was written with zeros up front."""
    folder = save_reference("air_like", tmp_path)
    config = dict(model=str(folder), dtype="float32", device="cpu", max_model_len=512,
                  kv_cache_memory_bytes=256 << 20)
    engine = LLMEngine(EngineConfig(**config))
    cache = engine.kv_cache
    assert cache.untyped_storage().nbytes() >= 200 << 20
    assert resident_bytes(cache) < 1 << 20  # counted page by page: the mapping may merge with a neighbour
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    lazy = complete(engine, list(range(3, 200)), params)
    assert 0 < resident_bytes(cache) < 16 << 20
    eager = LLMEngine(EngineConfig(**config))
    eager.kv_cache.fill_(0)
    assert complete(eager, list(range(3, 200)), params) == lazy


def complete(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> list[int]:
    engine.add_request("r", prompt, params)
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                return output.outputs[0].token_ids
    raise AssertionError("the request did not finish")


@pytest.mark.skipif(not Path("/proc/self/pagemap").exists(), reason="reads /proc/self/pagemap (Linux)")
def test_resident_bytes_counts_the_pages_written():
    eager, lazy = torch.zeros(64 << 20, dtype=torch.uint8), lazily_zeroed((64 << 20,), torch.uint8)
    assert resident_bytes(eager) >= 64 << 20 and resident_bytes(lazy) == 0  # eager: its pages, maybe one more
    lazy[: 5 << 20] = 1
    assert resident_bytes(lazy) == 5 << 20
