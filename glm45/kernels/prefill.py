"""glm45's CPU kernels for a bf16 model's many-row work at inference (prefill), called from torch: RMSNorm, the
routed experts of a chunk in one call, and causal attention over a sequence's chunk. Each returns None where it does
not apply (another device, dtype or shape, an instruction set without the kernel, autograd), and the caller then
runs torch's ops."""

from __future__ import annotations

import ctypes

import torch

from glm45.kernels import cpu


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """`RMSNorm` of a bf16 model's rows on CPU at inference, as the captured step computes it (an RMS summed in another
    order than torch's may move a value by one bf16 step); None when the kernels do not take it."""
    lib = cpu.library() if x.device.type == "cpu" else None
    if lib is None or x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or not cpu.at_inference(x, weight) \
            or not x.is_contiguous() or weight.shape != x.shape[-1:] or x.numel() == 0:
        return None
    D = x.shape[-1]
    y = torch.empty_like(x)
    lib.glm45_rms_norm_bf16(x.data_ptr(), x.numel() // D, D, D, weight.data_ptr(), eps, y.data_ptr(), D,
                            torch.get_num_threads())
    return y


def routed_experts(x: torch.Tensor, gate_up, down, token_of_row: torch.Tensor, weight_of_row: torch.Tensor,
                   rows_per_expert: list[int]) -> torch.Tensor | None:
    """Σ over each token's experts of weight · down(SiLU(gate) · up) for a bf16 model's stacked experts (gate_up
    [E, 2I, D], down [E, D, I]: bf16 tensors or `PackedWeight`s), from the assignments sorted by expert
    (`token_of_row`, float32 `weight_of_row`, `rows_per_expert`), as `Experts._by_expert` sums them with `linear`,
    in one call of the kernels (AVX512-BF16 builds); None when they do not apply."""
    from glm45.quant.packed import PackedWeight

    lib = cpu.library() if x.device.type == "cpu" else None
    if lib is None or not cpu.lib_gemm_rows(lib) or x.dtype != torch.bfloat16 or x.shape[-1] % 2 or down.shape[-1] % 2:
        return None
    for weight in (gate_up, down):
        if not cpu.at_inference(x, weight) or not isinstance(weight, PackedWeight) and (
                weight.dtype != torch.bfloat16 or not weight.is_contiguous()):
            return None
    gate_up_d, down_d = cpu.describe(gate_up), cpu.describe(down)
    if gate_up_d is None or down_d is None or not gate_up_d.num_experts == down_d.num_experts == len(rows_per_expert):
        return None
    x = x.contiguous()
    out = torch.zeros_like(x)
    counts = torch.tensor(rows_per_expert, dtype=torch.int64)
    tokens = token_of_row.to(torch.int64).contiguous()
    weights = weight_of_row.to(torch.float32).contiguous()
    lib.glm45_moe_bf16(ctypes.byref(gate_up_d), ctypes.byref(down_d), x.data_ptr(), x.shape[-1],
                       tokens.data_ptr(), weights.data_ptr(), counts.data_ptr(), out.data_ptr(), out.shape[-1],
                       cpu.MAX_KERNEL_ROWS + 1, torch.get_num_threads())
    return out


def causal_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     scale: float) -> torch.Tensor | None:
    """Causal attention of one sequence's chunk of queries (csrc/attention.c, on CPUs with AVX512-BF16): q [Tq, H, D]
    bf16 at positions Tk − Tq … Tk − 1, its keys and values at `slots` [Tk] of the paged caches [slots, KV, D]
    (bf16); the result [Tq, H, D] in fp32. None when the kernel does not take the call (another CPU, dtype or
    shape): the caller uses torch's attention. Measured on the Air-shaped benchmark model's 2,048-token prompt
    (8 heads, 2 KV heads, 128 dimensions, 2 threads): 16 ms a layer, against 55 ms for torch's
    `scaled_dot_product_attention` (its CPU flash kernel) on the same bf16 tensors."""
    lib = cpu.library() if q.device.type == "cpu" else None
    if (lib is None or not cpu.native_bf16_gemm() or q.dtype != torch.bfloat16 or k_cache.dtype != torch.bfloat16
            or v_cache.dtype != torch.bfloat16 or not (k_cache.is_contiguous() and v_cache.is_contiguous())):
        return None
    q = q.contiguous()
    slots = slots.to(torch.int64).contiguous()
    (tq, heads, dim), kv_heads = q.shape, k_cache.shape[-2]
    out = torch.empty(tq, heads, dim, dtype=torch.float32)
    status = lib.glm45_causal_attention(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(),
                                        out.data_ptr(), tq, slots.numel(), heads, kv_heads, dim, scale,
                                        torch.get_num_threads())
    return None if status else out
