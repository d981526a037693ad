"""Matrix products of packed weights off the CPU (GPUs), and the grouped expert GEMM on every device.

FP8 with one scale per output row: the activation rows are quantized to e4m3 with one scale per row (dynamic,
as GLM-4.5's FP8 releases specify) and multiplied by torch's scaled matmul, `torch._scaled_mm` (dense) or
`torch._scaled_grouped_mm` (expert stacks), with the two scale vectors applied to the fp32 accumulators.
Other layouts (FP8 with 128×128 block scales, int8, int4) are dequantized to the compute dtype on the fly —
correct but paying the dequantization; the first call of each kind tries the fast path once and remembers
whether this torch and GPU have it (before any CUDA graph capture, since the model runner warms up first).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from glm45.quant.packed import FP8_MAX, PackedWeight

logger = logging.getLogger(__name__)
_works: dict[str, bool] = {}


def _rowwise_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] → (e4m3 codes, fp32 scale per row [M, 1])."""
    scale = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def _try(kind: str, fast, slow):
    """fast() the first time it works (remembered per kind), else slow()."""
    if _works.get(kind) is False:
        return slow()
    try:
        out = fast()
        _works[kind] = True
        return out
    except (RuntimeError, NotImplementedError) as e:
        if kind not in _works:
            logger.warning("%s is not available here (%s); dequantizing instead", kind, str(e).splitlines()[0][:200])
        _works[kind] = False
        return slow()


def _fp8_rowwise(packed: PackedWeight, x: torch.Tensor) -> bool:
    return packed.format == "fp8" and packed.block == 0 and x.is_cuda


def linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, W) for a packed weight W [N, K] on a GPU."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])

    def slow():
        return F.linear(x2, packed.dequantize(x.dtype), bias)

    def fast():
        xq, scale = _rowwise_fp8(x2)
        y = torch._scaled_mm(xq, packed.data.t(), scale_a=scale, scale_b=packed.scale.float()[None, :],
                             out_dtype=x.dtype)
        return y if bias is None else y + bias

    y = _try("torch._scaled_mm (rowwise FP8)", fast, slow) if _fp8_rowwise(packed, x2) else slow()
    return y.view(*shape[:-1], y.shape[-1])


def _every_expert(x: torch.Tensor, stack: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The grouped product without a grouped GEMM kernel: every expert on every row (batched), then each row's
    own expert picked — fixed shapes and no host sync, but E times the work; used only where this torch or GPU
    has no `_grouped_mm`."""
    expert_of_row = torch.searchsorted(offsets, torch.arange(x.shape[0], device=x.device, dtype=offsets.dtype),
                                       right=True).clamp_(max=stack.shape[0] - 1)
    every = torch.bmm(x.unsqueeze(0).expand(stack.shape[0], -1, -1), stack.transpose(-2, -1))  # [E, rows, N]
    return every[expert_of_row, torch.arange(x.shape[0], device=x.device)]


def _grouped_plain(x: torch.Tensor, stack: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return _try("torch._grouped_mm", lambda: torch._grouped_mm(x, stack.transpose(-2, -1), offs=offsets),
                lambda: _every_expert(x, stack, offsets))


def grouped_mm(x: torch.Tensor, weight, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of x grouped by expert (`offsets`: each group's end, int32) times their expert's matrix of a stack
    [E, N, K] (plain or packed): one grouped GEMM."""
    if not isinstance(weight, PackedWeight):
        return _grouped_plain(x, weight, offsets)

    def slow():
        return _grouped_plain(x, weight.dequantize(x.dtype), offsets)

    def fast():
        xq, scale = _rowwise_fp8(x)
        return torch._scaled_grouped_mm(xq, weight.data.transpose(-2, -1), scale.squeeze(-1),
                                        weight.scale.float(), offs=offsets, out_dtype=x.dtype)

    return _try("torch._scaled_grouped_mm (rowwise FP8)", fast, slow) if _fp8_rowwise(weight, x) else slow()
