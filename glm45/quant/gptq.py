"""GPTQ for `glm45 quantize --calibration`: int8/int4 codes chosen so that each linear layer's outputs on calibration
text change least, in the same format and with the same block scales as round-to-nearest.

For a layer y = W x, rounding W to Ŵ changes its outputs on calibration inputs x by Σₓ ‖(W − Ŵ) x‖², a quadratic
form in each weight row with the Hessian H = Σₓ x xᵀ. GPTQ (Frantar et al., 2022) rounds the input columns in order
and moves each column's rounding error onto the columns not yet rounded, in the proportions the inverse Hessian
gives: with U the upper Cholesky factor of H⁻¹, rounding column j to q_j adds −(w_j − q_j) / U_jj · U_j,k to each
later column k. Columns go 128 at a time, the update of the columns beyond a block applied once per block. H is
damped by 1% of its mean diagonal (more if it is still not positive definite), and an input no calibration token
used is rounded to nearest without moving anything.

The block scales and minimums are round-to-nearest's (`packed.quantize`); only the codes change, so a calibrated
checkpoint loads and runs like any other. The Hessians come from `calibration.part_hessians`; a weight no
calibration token reached (an expert nothing was routed to) keeps round-to-nearest's codes.
"""

from __future__ import annotations

import dataclasses

import torch

from glm45.quant.packed import QBLOCK, PackedWeight, _expand_codes, quantize

DAMPING = (0.01, 0.1, 1.0)  # × mean diagonal, tried in turn until H + damping is positive definite
COLUMN_BLOCK = 128
FACTOR_BYTES = 256 << 20  # float64 Hessians factored at a time
SLICE_BYTES = 1 << 30  # float32 weights and factors of the experts whose columns are rounded together
ROW_BYTES = 128 << 20  # float32 weights of the rows rounded together


def _inverse_factors(hessians: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factors of the damped inverse Hessians [B, K, K], float32, factored in float64 a few at a
    time."""
    step = max(1, FACTOR_BYTES // (8 * hessians.shape[-1] ** 2))
    return torch.cat([_inverse_factors_f64(hessians[i:i + step]) for i in range(0, hessians.shape[0], step)])


def _inverse_factors_f64(hessians: torch.Tensor) -> torch.Tensor:
    h = hessians.double().clone()
    diagonal = h.diagonal(dim1=-2, dim2=-1)
    diagonal[diagonal == 0] = 1.0  # an unused input: rounded to nearest, moving nothing onto other columns
    mean = diagonal.mean(-1, keepdim=True)
    for damping in DAMPING:
        factor, info = torch.linalg.cholesky_ex(h + torch.diag_embed((damping * mean).expand_as(diagonal)))
        if not info.any():
            break
    else:
        raise ValueError("a calibration Hessian stayed singular after damping by its mean diagonal")
    return torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True).float()


def _grid(base: PackedWeight) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(scale, offset) per block [..., N, K/32] and the codes' range of a round-to-nearest packed weight: a code q
    stands for scale · q + offset."""
    if base.format == "int8":
        scale = base.scale.float()
        return scale, torch.zeros_like(scale), -127, 127
    scale, offset = _expand_codes(base.scale.float(), base.minimum.float(), base.sub_scale, base.sub_min)
    return scale, offset, 0, 15


def _packed_codes(fmt: str, q: torch.Tensor) -> torch.Tensor:
    if fmt == "int8":
        return q.to(torch.int8)
    *lead, k = q.shape
    q = q.to(torch.uint8).reshape(*lead, k // QBLOCK, QBLOCK)
    return (q[..., :QBLOCK // 2] | (q[..., QBLOCK // 2:] << 4)).reshape(*lead, k // 2)


def _round_columns(w: torch.Tensor, factors: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                   low: int, high: int) -> torch.Tensor:
    """GPTQ's codes [B, N, K] for weights [B, N, K], given U [B, K, K] and each block's scale and offset."""
    w = w.float().clone()
    inverse = torch.where(scale > 0, 1.0 / torch.where(scale > 0, scale, 1.0), torch.zeros_like(scale))
    codes = torch.empty_like(w)
    k = w.shape[-1]
    for start in range(0, k, COLUMN_BLOCK):
        stop = min(start + COLUMN_BLOCK, k)
        block, errors = w[..., start:stop].clone(), torch.empty_like(w[..., start:stop])
        u = factors[:, start:stop, start:stop]
        for j in range(stop - start):
            g = (start + j) // QBLOCK
            column = block[..., j]
            q = torch.round((column - offset[..., g]) * inverse[..., g]).clamp_(low, high)
            codes[..., start + j] = q
            error = (column - (scale[..., g] * q + offset[..., g])) / u[:, j, j, None]
            block[..., j:] -= error[..., None] * u[:, None, j, j:]
            errors[..., j] = error
        w[..., stop:] -= errors @ factors[:, start:stop, stop:]
    return codes


def quantize_calibrated(w: torch.Tensor, fmt: str, hessian: torch.Tensor | None,
                        base: PackedWeight | None = None) -> PackedWeight:
    """`w` ([N, K], or an expert stack [E, N, K]) packed in int8 or int4 with GPTQ's codes for `hessian` ([K, K] or
    [E, K, K]); round-to-nearest's where there is no Hessian, or for an expert whose Hessian is zero. `base`: `w`
    already rounded to nearest in `fmt`, if at hand."""
    base = base if base is not None else quantize(w, fmt)
    if hessian is None:
        return base
    stacked = w.dim() == 3
    w3, h3 = (w, hessian) if stacked else (w[None], hessian[None])
    scale, offset, low, high = _grid(base)
    scale, offset = (scale, offset) if stacked else (scale[None], offset[None])
    base_codes = base.data if stacked else base.data[None]
    codes = torch.empty_like(base_codes)
    used = h3.flatten(1).any(-1)
    n, k = w3.shape[-2:]
    per_slice = max(1, SLICE_BYTES // (4 * (n * k + k * k)))
    rows = max(1, ROW_BYTES // (4 * k))  # rows are rounded independently: a large head goes a slice at a time
    for first in range(0, w3.shape[0], per_slice):
        part = slice(first, first + per_slice)
        factors = _inverse_factors(h3[part])
        for start in range(0, n, rows):
            r = slice(start, start + rows)
            q = _round_columns(w3[part, r], factors, scale[part, r], offset[part, r], low, high)
            codes[part, r] = torch.where(used[part, None, None], _packed_codes(fmt, q), base_codes[part, r])
    return dataclasses.replace(base, data=codes if stacked else codes[0])
