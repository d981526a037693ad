"""The captured decode step on CUDA: the model's forward for a few rows recorded once per row count as a CUDA
graph and replayed, so a step costs its kernels and not the Python that launches them.

A graph replays fixed shapes and fixed memory with no host involvement, so everything inside the step is
made so: the inputs (tokens, positions, KV slots, block tables, context lengths) live in static device
buffers, filled before each replay from pinned host buffers with asynchronous copies; attention reads the
paged cache through indices computed on the device from the block tables (`StaticDecodeAttention`); the MoE
uses the grouped-GEMM dispatch with offsets computed on the device (`Experts.sync_free`); and the logits stay
on the device (greedy sampling takes their argmax there). The only host sync of a step is reading the sampled
tokens. As on CPU, rows are padded to the captured size with rows that write to a scratch KV block.

The eager path stays the reference (prefill chunks longer than the largest size, MTP drafting, and
`--enforce-eager`); tests/test_sync_free.py runs this step's code on CPU and counts its synchronising ops.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

from glm45.engine.attention import StepInputs, fill_rows, read, write
from glm45.model.moe import Experts

logger = logging.getLogger(__name__)

DEFAULT_SIZES = (1, 2, 4, 8, 16, 32, 64)


def default_sizes() -> tuple[int, ...]:
    return DEFAULT_SIZES


class StaticDecodeAttention:
    """The model's AttentionContext for rows that each attend over their own cached context, in fixed shapes:
    every row reads `max_blocks` blocks of its table and masks the positions past its context length."""

    def __init__(self, kv_cache: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor, context: torch.Tensor,
                 block_size: int):
        rows, max_blocks = tables.shape
        device = tables.device
        self.kv_cache, self.slots = kv_cache, slots
        offsets = torch.arange(block_size, device=device)
        self.kv_index = (tables.long()[:, :, None] * block_size + offsets).reshape(rows, max_blocks * block_size)
        visible = torch.arange(max_blocks * block_size, device=device)[None, :] < context[:, None]
        self.mask = visible[:, None, None, :]  # [rows, 1 head, 1 query, keys]

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        heads, head_dim = k.shape[-2:]
        k_cache = self.kv_cache[layer_idx, 0].view(-1, heads, head_dim)
        v_cache = self.kv_cache[layer_idx, 1].view(-1, heads, head_dim)
        write(k_cache, self.slots, k)
        write(v_cache, self.slots, v)
        keys = read(k_cache, self.kv_index, q.dtype).transpose(1, 2)      # [rows, kv heads, keys, hd]
        values = read(v_cache, self.kv_index, q.dtype).transpose(1, 2)
        out = F.scaled_dot_product_attention(q[:, :, None, :], keys, values, attn_mask=self.mask, enable_gqa=True)
        return out[:, :, 0, :]


def use_sync_free_experts(model) -> None:
    for module in model.modules():
        if isinstance(module, Experts):
            module.sync_free = True


class CapturedCudaDecode:
    def __init__(self, model, kv_cache: torch.Tensor, block_size: int, scratch_block: int, max_model_len: int,
                 sizes=DEFAULT_SIZES):
        start = time.perf_counter()
        self.model, self.kv_cache, self.block_size, self.scratch_block = model, kv_cache, block_size, scratch_block
        self.sizes = sorted(sizes)
        device, rows = model.device, self.sizes[-1]
        max_blocks = -(-max_model_len // block_size) + 1
        names = {"tokens": torch.int64, "positions": torch.int64, "slots": torch.int64, "context": torch.int32}
        self.device_inputs = {n: torch.zeros(rows, dtype=t, device=device) for n, t in names.items()}
        self.device_inputs["tables"] = torch.zeros(rows, max_blocks, dtype=torch.int32, device=device)
        self.host_inputs = {n: torch.zeros_like(t, device="cpu").pin_memory() for n, t in self.device_inputs.items()}
        self._np = {n: t.numpy() for n, t in self.host_inputs.items()}
        self.uploaded = torch.cuda.Event()  # the pinned buffers may be rewritten once their copies are done
        use_sync_free_experts(model)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            for size in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory pool
                fill_rows(self._np, StepInputs([], [], []), block_size, scratch_block, size)
                self._upload()
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):  # warm-up: lazy initialisation, and the fast paths' first tries
                        self._forward(size)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    hidden, logits = self._forward(size)
                self.graphs[size] = (graph, hidden, logits)
        torch.cuda.synchronize()
        logger.info("captured the CUDA decode step for %s rows in %.1f s", self.sizes, time.perf_counter() - start)

    def size_for(self, rows: int) -> int | None:
        return next((n for n in self.sizes if n >= rows), None)

    def _forward(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.device_inputs
        ctx = StaticDecodeAttention(self.kv_cache, d["slots"][:size], d["tables"][:size], d["context"][:size],
                                    self.block_size)
        hidden = self.model.hidden_states(d["tokens"][:size], d["positions"][:size], ctx)
        return hidden, self.model.compute_logits(hidden).float()

    def _upload(self) -> None:
        for name, tensor in self.device_inputs.items():
            tensor.copy_(self.host_inputs[name], non_blocking=True)
        self.uploaded.record()

    def forward(self, inputs, logit_rows: list[int]) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(float32 logits at `logit_rows`, final hidden states) of the target model, on the device."""
        n = len(inputs.token_ids)
        size = self.size_for(n)
        self.uploaded.synchronize()
        fill_rows(self._np, inputs, self.block_size, self.scratch_block, size)
        self._upload()
        graph, hidden, logits = self.graphs[size]
        graph.replay()
        if not logit_rows:
            return None, hidden[:n]
        if logit_rows == list(range(len(logit_rows))):
            return logits[: len(logit_rows)], hidden[:n]
        index = torch.tensor(logit_rows, dtype=torch.long).pin_memory().to(logits.device, non_blocking=True)
        return logits[index], hidden[:n]
