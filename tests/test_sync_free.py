"""The GPU decode step's code (what CUDA graphs capture: static-shape paged attention, the grouped-GEMM MoE
dispatch), run on CPU: no synchronising op inside the forward, a launch count that does not grow with the
number of active experts, and the same logits as the eager reference path."""

import pytest
import torch
from tiny_checkpoints import save_reference
from torch.utils._python_dispatch import TorchDispatchMode

from glm45.engine.attention import PagedAttention, SeqSlice
from glm45.engine.captured_cuda import StaticDecodeAttention, use_sync_free_experts
from glm45.engine.model_runner import allocate_kv_cache
from glm45.model import Glm4MoeForCausalLM

# Ops that make the host wait for the device: a scalar read, or an output whose size depends on the data.
SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_consecutive",
           "bincount", "repeat_interleave", "masked_scatter", "item"}
BLOCK = 4


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.syncs, self.names = 0, [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops += 1
        self.names.append(name)
        if name in SYNCING:
            self.syncs.append(name)
        if name == "index" and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool
                                   for t in (args[1] if len(args) > 1 else [])):
            self.syncs.append("boolean index")
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = save_reference("grouped", tmp_path_factory.mktemp("grouped"))
    return Glm4MoeForCausalLM.from_pretrained(folder, dtype="float32", progress=False).eval()


def decode_inputs(rows: int, context: int, tokens: list[int]):
    tables = torch.arange(rows * 8, dtype=torch.int32).view(rows, 8)
    positions = torch.full((rows,), context - 1)
    slots = tables[:, (context - 1) // BLOCK].long() * BLOCK + (context - 1) % BLOCK
    return torch.tensor(tokens), positions, slots, tables, torch.full((rows,), context, dtype=torch.int32)


def prefill(model, kv_cache, tables, prompt_len: int):
    rows = tables.shape[0]
    ids = torch.randint(0, 320, (rows * prompt_len,), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(prompt_len).repeat(rows)
    slots = torch.cat([tables[r, torch.arange(prompt_len) // BLOCK].long() * BLOCK + torch.arange(prompt_len) % BLOCK
                       for r in range(rows)])
    slices = [SeqSlice(r * prompt_len, prompt_len, prompt_len, tables[r].tolist()) for r in range(rows)]
    model.hidden_states(ids, positions, PagedAttention(kv_cache, slots, slices, BLOCK))


def test_the_gpu_decode_step_has_no_host_syncs_and_launches_independent_of_routing(model):
    use_sync_free_experts(model)
    counts = []
    for tokens in ([5, 5, 5, 5], [3, 77, 150, 260]):  # the same token four times routes to fewer experts
        kv_cache = allocate_kv_cache(3, 64, BLOCK, 2, 16, torch.float32, torch.device("cpu"))
        ids, positions, slots, tables, context = decode_inputs(4, 9, tokens)
        with torch.inference_mode():
            prefill(model, kv_cache, tables, 8)
            counter = OpCounter()
            with counter:
                ctx = StaticDecodeAttention(kv_cache, slots, tables, context, BLOCK)
                model.compute_logits(model.hidden_states(ids, positions, ctx))
        assert counter.syncs == [], counter.syncs
        counts.append(counter.ops)
    assert counts[0] == counts[1]


def test_the_counter_sees_the_eager_paths_syncs(model):
    """The eager path (per-step index tensors built on the host, `bincount(...).tolist()` per MoE layer) syncs."""
    for module in model.modules():
        if hasattr(module, "sync_free"):
            module.sync_free = False
    kv_cache = allocate_kv_cache(3, 64, BLOCK, 2, 16, torch.float32, torch.device("cpu"))
    ids, positions, slots, tables, context = decode_inputs(8, 9, list(range(8)))
    with torch.inference_mode():
        prefill(model, kv_cache, tables, 8)
        counter = OpCounter()
        with counter:
            ctx = PagedAttention(kv_cache, slots, [SeqSlice(r, 1, 9, tables[r].tolist()) for r in range(8)], BLOCK)
            model.hidden_states(ids, positions, ctx)
    assert "_local_scalar_dense" in counter.syncs or "bincount" in counter.syncs


def test_the_gpu_decode_step_equals_the_eager_reference(model):
    ids, positions, slots, tables, context = decode_inputs(3, 9, [4, 99, 311])
    logits = []
    for sync_free in (False, True):
        for module in model.modules():
            if hasattr(module, "sync_free"):
                module.sync_free = sync_free
        kv_cache = allocate_kv_cache(3, 64, BLOCK, 2, 16, torch.float32, torch.device("cpu"))
        with torch.inference_mode():
            prefill(model, kv_cache, tables, 8)
            if sync_free:
                ctx = StaticDecodeAttention(kv_cache, slots, tables, context, BLOCK)
            else:
                ctx = PagedAttention(kv_cache, slots, [SeqSlice(r, 1, 9, tables[r].tolist()) for r in range(3)], BLOCK)
            logits.append(model.compute_logits(model.hidden_states(ids, positions, ctx)))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)
