"""Paged attention against a plain per-sequence reference: short slices share one padded call (grouped heads folded
into the query length), long ones run alone (bf16 ones through the fused CPU kernel where it runs); every new row
sees exactly its own sequence's keys up to itself."""

import pytest
import torch
import torch.nn.functional as F

from glm45.engine.attention import PagedAttention, SeqSlice, grouped_attention
from glm45.kernels import cpu as cpu_kernels
from glm45.kernels import prefill


def reference(q, keys, values):
    """q [Q, H, hd] as the last Q positions of keys/values [L, KVH, hd]: causal attention, K/V heads repeated."""
    group = q.shape[1] // keys.shape[1]
    k, v = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    q_len, keys_len = q.shape[0], keys.shape[0]
    mask = torch.ones(q_len, keys_len, dtype=torch.bool).tril(keys_len - q_len)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)
    return out.transpose(0, 1)


def paged_sequences(kv_cache, shapes, block_size):
    """Sequences of (cached, new) tokens with random keys and values in the cache's dtype, their cached part written
    into randomly chosen blocks: (slices, slots of the new tokens, (keys, values) per sequence, new keys, new
    values)."""
    _, _, num_blocks, _, kv_heads, head_dim = kv_cache.shape
    free = iter(torch.randperm(num_blocks).tolist())
    slices, slots, history, q_start = [], [], [], 0
    for cached, new in shapes:
        total = cached + new
        table = [next(free) for _ in range(-(-total // block_size))]
        keys = torch.randn(total, kv_heads, head_dim).to(kv_cache.dtype)
        values = torch.randn(total, kv_heads, head_dim).to(kv_cache.dtype)
        positions = torch.arange(total)
        flat = torch.tensor(table)[positions // block_size] * block_size + positions % block_size
        kv_cache[0, 0].view(-1, kv_heads, head_dim)[flat[:cached]] = keys[:cached]
        kv_cache[0, 1].view(-1, kv_heads, head_dim)[flat[:cached]] = values[:cached]
        slices.append(SeqSlice(q_start, new, total, table))
        slots.append(flat[cached:])
        history.append((keys, values))
        q_start += new
    k_new = torch.cat([keys[cached:] for (keys, _), (cached, _) in zip(history, shapes, strict=True)])
    v_new = torch.cat([values[cached:] for (_, values), (cached, _) in zip(history, shapes, strict=True)])
    return slices, slots, history, k_new, v_new


def test_grouped_attention_is_sdpa_with_grouped_heads():
    torch.manual_seed(0)
    for batch, heads, kv_heads, q_len, keys_len in ((5, 8, 2, 1, 37), (3, 6, 3, 4, 20), (2, 4, 1, 16, 16)):
        q = torch.randn(batch, heads, q_len, 16)
        k, v = torch.randn(batch, kv_heads, keys_len, 16), torch.randn(batch, kv_heads, keys_len, 16)
        mask = torch.rand(batch, 1, q_len, keys_len) < 0.7
        mask[..., 0] = True
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        torch.testing.assert_close(grouped_attention(q, k, v, mask), expected, atol=1e-5, rtol=1e-5)


def test_paged_attention_equals_each_sequence_alone():
    torch.manual_seed(1)
    block_size, kv_heads, heads, head_dim, num_blocks = 4, 2, 8, 16, 64
    kv_cache = torch.zeros(1, 2, num_blocks, block_size, kv_heads, head_dim)
    # (cached tokens, new tokens): decode rows, a few MTP-like rows, a long prefill chunk after a prefix, a fresh
    # prompt
    shapes = [(9, 1), (30, 1), (0, 3), (5, 2), (12, 40), (0, 25)]
    slices, slots, history, k_new, v_new = paged_sequences(kv_cache, shapes, block_size)
    q = torch.randn(sum(new for _, new in shapes), heads, head_dim)
    attention = PagedAttention(kv_cache, torch.cat(slots), slices, block_size)
    out = attention.attend(0, q, k_new, v_new)
    for s, (keys, values) in zip(slices, history, strict=True):
        rows = slice(s.q_start, s.q_start + s.q_len)
        torch.testing.assert_close(out[rows], reference(q[rows], keys, values), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(cpu_kernels.library() is None or not cpu_kernels.native_bf16_gemm(),
                    reason="this CPU has no AVX512-BF16: prefill chunks take torch's SDPA only")
def test_bf16_prefill_chunks_take_the_fused_kernel_and_match_torchs_attention(monkeypatch):
    """Long slices of a bf16 cache (a fresh prompt, a chunk after a cached prefix) go through the fused CPU kernel;
    its rows are as close to a float32 reference as torch's own bf16 attention is, and the short rows are not its."""
    torch.manual_seed(2)
    block_size, kv_heads, heads, head_dim, num_blocks = 16, 2, 8, 64, 64
    kv_cache = torch.zeros(1, 2, num_blocks, block_size, kv_heads, head_dim, dtype=torch.bfloat16)
    shapes = [(0, 70), (45, 33), (20, 1)]
    slices, slots, history, k_new, v_new = paged_sequences(kv_cache, shapes, block_size)
    q = torch.randn(sum(new for _, new in shapes), heads, head_dim).bfloat16()
    calls = []
    fused = prefill.causal_attention
    monkeypatch.setattr(prefill, "causal_attention", lambda *a: calls.append(a[0].shape[0]) or fused(*a))
    out = PagedAttention(kv_cache.clone(), torch.cat(slots), slices, block_size).attend(0, q, k_new, v_new)
    assert calls == [70, 33]
    monkeypatch.setattr(prefill, "causal_attention", lambda *a: None)
    plain = PagedAttention(kv_cache.clone(), torch.cat(slots), slices, block_size).attend(0, q, k_new, v_new)
    for s, (keys, values) in zip(slices, history, strict=True):
        rows = slice(s.q_start, s.q_start + s.q_len)
        expected = reference(q[rows].float(), keys.float(), values.float())
        fused_error = (out[rows].float() - expected).abs().max()
        assert fused_error <= 1.5 * (plain[rows].float() - expected).abs().max() + 1e-3
        if s.q_len == 1:
            assert torch.equal(out[rows], plain[rows])
