"""Paged attention for one engine step: the model's `AttentionContext` over the paged KV cache.

The step's tokens arrive flattened, `[N, heads, head_dim]`, sequence after sequence. `attend` writes their
K/V into the cache slots given by `slot_mapping`, then lets each sequence's queries attend over its own
cached past (positions 0 … ctx_len-1, causally offset for the new tokens). An FP8 cache (`--kv-cache-dtype
fp8`) holds e4m3 values at scale 1, as vLLM does for checkpoints without KV scales, and is widened on read.

Sequences with few new tokens (decode, speculative verification) are gathered into one padded batch and
served by one SDPA call per layer, with K/V sliced to the longest context in the batch, not the whole
cache. Long prefill chunks get a call of their own, with the causal fast path when nothing is cached.
The gather indices and masks are built once per step and shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from glm45.kernels import prefill as prefill_kernels

SHORT_QUERY = 16  # sequences with at most this many new tokens share the padded batch


def write(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    """cache[slots] = values, converting to the cache's dtype (an FP8 cache saturates at ±448, scale 1)."""
    if cache.dtype == torch.float8_e4m3fn:  # torch has no index_copy_ for float8: copy the bytes
        cache.view(torch.uint8).index_copy_(0, slots, values.to(cache.dtype).view(torch.uint8))
    else:
        cache.index_copy_(0, slots, values.to(cache.dtype))


def grouped_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      mask: torch.Tensor) -> torch.Tensor:
    """SDPA of query [B, H, Q, hd] over grouped keys/values [B, KVH, L, hd] with a boolean mask [B, 1, Q, L]. The
    G = H / KVH query heads that share a KV head are folded into the query length ([B, KVH, G·Q, hd], the mask
    repeated G times), which is the same sum as `enable_gqa`; for short queries it runs ~7× faster on CPUs, where
    SDPA's grouped path with a mask takes a slow kernel (64 sequences × 640 keys, one query each: 28 → 4 ms)."""
    b, heads, q_len, head_dim = query.shape
    kv_heads, keys_len = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    folded = query.reshape(b, kv_heads, group * q_len, head_dim)
    mask = mask[:, :, None].expand(b, 1, group, q_len, keys_len).reshape(b, 1, group * q_len, keys_len)
    out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=mask)
    return out.reshape(b, heads, q_len, head_dim)


def read(cache: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """cache[index] in the compute dtype."""
    if cache.dtype == torch.float8_e4m3fn:
        return cache.view(torch.uint8)[index].view(cache.dtype).to(dtype)
    return cache[index]


@dataclass
class SeqSlice:
    """One sequence's part of the step: rows [q_start, q_start + q_len) of the flat tokens, attending over
    cache positions [0, ctx_len) where the last q_len of them are its new tokens."""

    q_start: int
    q_len: int
    ctx_len: int
    block_table: list[int]
    seq_id: int = -1  # whose table it is (tensor parallelism sends a known table's new entries only); -1: unnamed


@dataclass
class StepInputs:
    """The flat tokens of one forward over the cache, sequence after sequence."""

    token_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    slices: list[SeqSlice] = field(default_factory=list)
    adapter_ids: list[int] | None = None  # per token, the LoRA slot it runs with (engine/lora.py); None: base only


def fill_rows(arrays: dict, inputs, block_size: int, scratch_block: int, size: int) -> None:
    """Write a step's rows into the fixed-size input arrays of a captured step (numpy views: tokens, positions,
    slots, tables [rows, max blocks], context), and pad rows n..size-1: token 0 at position 0, writing to the
    scratch block and attending to itself only."""
    n = len(inputs.token_ids)
    a = arrays
    a["tokens"][:n] = inputs.token_ids
    a["positions"][:n] = inputs.positions
    a["slots"][:n] = inputs.slot_mapping
    for s in inputs.slices:
        table = s.block_table[: -(-s.ctx_len // block_size)]
        rows = slice(s.q_start, s.q_start + s.q_len)
        a["tables"][rows, : len(table)] = table
        a["context"][rows] = np.arange(s.ctx_len - s.q_len + 1, s.ctx_len + 1)
    a["tokens"][n:size] = 0
    a["positions"][n:size] = 0
    a["slots"][n:size] = scratch_block * block_size
    a["tables"][n:size, 0] = scratch_block
    a["context"][n:size] = 1


class PagedAttention:
    def __init__(self, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, slices: list[SeqSlice], block_size: int):
        self.kv_cache = kv_cache  # [layers, 2, blocks, block_size, kv_heads, head_dim]
        self.slot_mapping = slot_mapping
        device = slot_mapping.device

        def slots(s: SeqSlice) -> torch.Tensor:
            table = torch.tensor(s.block_table, dtype=torch.long)
            return (table[:, None] * block_size + torch.arange(block_size)).reshape(-1)[: s.ctx_len]

        short = [s for s in slices if s.q_len <= SHORT_QUERY]
        # Long slices (prefill chunks): their slots, and a causal mask offset by the cached prefix, built once
        # per step for all layers (None when nothing is cached: the causal fast path needs no mask).
        self.long = [(s, slots(s).to(device), None if s.ctx_len == s.q_len else torch.ones(
            s.q_len, s.ctx_len, dtype=torch.bool, device=device).tril(diagonal=s.ctx_len - s.q_len))
            for s in slices if s.q_len > SHORT_QUERY]
        self.batch = self._padded_batch(short, block_size, device) if short else None

    @staticmethod
    def _padded_batch(short: list[SeqSlice], block_size: int, device: torch.device):
        """Gather indices and mask for one SDPA call over all short sequences, built without a per-sequence
        loop of tensor ops (it runs every step, for up to max_num_seqs sequences)."""
        q_start = torch.tensor([s.q_start for s in short])
        q_len = torch.tensor([s.q_len for s in short])
        ctx_len = torch.tensor([s.ctx_len for s in short])
        q_max, ctx_max = int(q_len.max()), int(ctx_len.max())
        num_blocks = -(-ctx_max // block_size)
        table = torch.tensor([s.block_table[:num_blocks] + [0] * (num_blocks - len(s.block_table[:num_blocks]))
                              for s in short])
        kv_slots = (table[:, :, None] * block_size + torch.arange(block_size)).reshape(len(short), -1)[:, :ctx_max]
        query_index = torch.arange(q_max)
        valid = query_index[None, :] < q_len[:, None]                                  # [B, Q]
        q_rows = torch.where(valid, q_start[:, None] + query_index[None, :], 0)
        # query i of a sequence sits at position ctx_len - q_len + i and sees keys up to there; padding
        # rows see at least key 0, so they stay finite (their output is dropped).
        last_visible = (ctx_len - q_len)[:, None] + query_index[None, :]               # [B, Q]
        mask = torch.arange(ctx_max)[None, None, :] <= last_visible[:, :, None]         # [B, Q, L]
        valid_flat = valid.reshape(-1)
        return (q_rows.to(device), kv_slots.to(device), mask[:, None].to(device), valid_flat.to(device),
                q_rows.reshape(-1)[valid_flat].to(device))

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache = self.kv_cache[layer_idx, 0].view(-1, k.shape[-2], k.shape[-1])
        v_cache = self.kv_cache[layer_idx, 1].view(-1, v.shape[-2], v.shape[-1])
        write(k_cache, self.slot_mapping, k)
        write(v_cache, self.slot_mapping, v)
        out = torch.empty_like(q)
        if self.batch is not None:
            q_rows, kv_slots, mask, valid, out_rows = self.batch
            # [B, Q, H, hd] → [B, H, Q, hd]
            batch_out = grouped_attention(q[q_rows].transpose(1, 2), read(k_cache, kv_slots, q.dtype).transpose(1, 2),
                                          read(v_cache, kv_slots, q.dtype).transpose(1, 2), mask).transpose(1, 2)
            out[out_rows] = batch_out.reshape(-1, *q.shape[1:])[valid]
        for s, kv_slots, mask in self.long:
            rows = slice(s.q_start, s.q_start + s.q_len)
            # bf16 on CPUs with bf16 dot products: the fused kernel reads the cache in place (2.6× torch's SDPA)
            fused = prefill_kernels.causal_attention(q[rows], k_cache, v_cache, kv_slots, q.shape[-1] ** -0.5)
            if fused is not None:
                out[rows] = fused.to(out.dtype)
                continue
            query = q[rows].transpose(0, 1)[None]
            keys = read(k_cache, kv_slots, q.dtype).transpose(0, 1)[None]
            values = read(v_cache, kv_slots, q.dtype).transpose(0, 1)[None]
            if mask is None:
                result = F.scaled_dot_product_attention(query, keys, values, is_causal=True, enable_gqa=True)
            else:
                if q.is_cuda:
                    # On GPUs a mask together with grouped KV heads can fall back to the math kernel, which holds
                    # every score in fp32 (≈ 25 GB for a 2k chunk over a 32k context with 96 heads); with the KV
                    # heads repeated, the memory-efficient kernel takes the mask.
                    group = query.shape[1] // keys.shape[1]
                    keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
                result = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask,
                                                        enable_gqa=not q.is_cuda)
            out[rows] = result[0].transpose(0, 1)
        return out
