"""Optimizers for training GLM-4.5 models: Muon for the hidden matrices, AdamW for everything else.

Muon (momentum, then an approximate orthogonalisation of the update by a Newton–Schulz iteration) is the
optimizer GLM-4.5 was trained with. It is defined for matrices only, and GLM-4.5's routed experts are stacked
3-D tensors (`gate_up_proj [E, 2I, D]`, `down_proj [E, D, I]`), so `BatchedMuon` applies torch.optim.Muon's
exact update (same momentum, Nesterov, quintic Newton–Schulz) to every matrix slice at once with batched
matmuls; a test checks it against torch.optim.Muon on 2-D matrices. It also takes the 2-D hidden matrices
(attention projections, dense and shared-expert MLPs, the MTP `eh_proj`): torch.optim.Muon always iterates in
bfloat16, which on CPUs without bf16 matrix units was ~100× slower than the whole forward/backward pass
(15 s per step on the bundled model), so BatchedMuon iterates in float32 on those CPUs and in bfloat16 on GPUs
and on CPUs with AVX512-BF16 or AMX (where it is faster than float32).
Under FSDP2 (`glm45.parallel.data_parallel`, parameters sharded on dim 0 as DTensors) the momentum buffer stays
sharded like its parameter. An expert stack is sharded on its expert dim, so each rank holds whole expert
matrices and orthogonalises its own; a 2-D matrix is split across ranks, so its update is all-gathered, every
rank runs the same Newton–Schulz on the whole matrix and keeps its own rows — exactly the single-process update,
at the price of one all-gather per matrix per step and the iteration repeated on every rank.
All matrices use the `match_rms_adamw` learning-rate adjustment, `lr · 0.2·sqrt(max(A, B))` for an A×B
matrix, which makes the update's RMS match AdamW's so that one learning rate serves both optimizers. Embeddings, output
heads, norms, biases and routers stay on AdamW (`--optimizer adamw` puts every parameter there).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

MUON_NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)
OPTIMIZER_CHOICES = ("muon", "adamw")

# Matrices Muon must not take even though they are 2-D: embeddings, output heads and MoE routers.
_ADAMW_ONLY = re.compile(r"(embed_tokens|lm_head|shared_head\.head|\.gate)\.weight$")


def newton_schulz(update: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                  coefficients: tuple[float, float, float] = MUON_NS_COEFFICIENTS,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximately orthogonalise the last two dims of `update` [..., A, B] (torch.optim.Muon's quintic
    iteration, batched over leading dims, computed in `dtype`)."""
    a, b, c = coefficients
    x = update.to(dtype)
    transposed = update.size(-2) > update.size(-1)
    if transposed:
        x = x.mT
    # Dividing by the Frobenius norm bounds the spectral norm by 1, where the iteration converges.
    shape = x.shape
    x = x.reshape(-1, *shape[-2:])  # [batch, A, B]
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b·G + c·G²
        x = torch.baddbmm(x, poly, x, beta=a)  # a·X + (b·G + c·G²)·X
    x = x.reshape(shape)
    return x.mT if transposed else x


def orthogonalise(update: torch.Tensor, steps: int, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """`newton_schulz` of a plain update, or of an FSDP2-sharded one (a DTensor sharded on dim 0) as if whole."""
    if not isinstance(update, DTensor):
        return newton_schulz(update, steps, eps, dtype=dtype)
    if tuple(update.placements) != (Shard(0),):
        raise ValueError(f"Muon takes parameters sharded on dim 0 over one mesh dim, got {update.placements}")
    if update.dim() >= 3:  # expert stacks: the local shard is whole expert matrices
        local = newton_schulz(update.to_local(), steps, eps, dtype=dtype)
        return DTensor.from_local(local, update.device_mesh, update.placements, shape=update.shape,
                                  stride=update.stride())
    whole = newton_schulz(update.full_tensor(), steps, eps, dtype=dtype)
    return distribute_tensor(whole, update.device_mesh, update.placements, src_data_rank=None)  # own rows, no comms


@functools.cache
def _cpu_has_bf16_matmul() -> bool:
    # torch.cpu's feature probes are private; a torch without them is treated as a CPU without bf16 units.
    probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(probe is not None and probe() for probe in probes)


def _default_ns_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "cpu" and not _cpu_has_bf16_matmul() else torch.bfloat16


def muon_lr_scale(shape: torch.Size) -> float:
    """`match_rms_adamw`: 0.2·sqrt(max(A, B)) for the matrix dims A×B (the last two dims)."""
    return 0.2 * math.sqrt(max(shape[-2], shape[-1]))


class BatchedMuon(torch.optim.Optimizer):
    """Muon for stacks of matrices [..., A, B]: every slice gets torch.optim.Muon's update, in one batch."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float = 1e-3, weight_decay: float = 0.0,
                 momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5, eps: float = 1e-7,
                 ns_dtype: torch.dtype | None = None):
        """`ns_dtype`: the Newton–Schulz precision; None = bfloat16 (as torch.optim.Muon) on GPUs and on CPUs
        with native bf16 matmuls (where it takes 0.15 s of the bundled model's 1.7 s step instead of 0.25 s),
        float32 on other CPUs (where bf16 is emulated and slower)."""
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1:
            raise ValueError(f"invalid Muon settings: lr={lr} and weight_decay={weight_decay} must be >= 0, "
                             f"momentum={momentum} in [0, 1)")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      ns_steps=ns_steps, eps=eps))
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() < 2:
                    raise ValueError(f"BatchedMuon takes matrices or stacks of matrices, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                ns_dtype = self.ns_dtype or _default_ns_dtype(p.device)
                update = orthogonalise(update, group["ns_steps"], group["eps"], ns_dtype).to(p.dtype)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * muon_lr_scale(p.shape))
        return loss


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
    """Trainable parameters → (2-D Muon matrices, ≥3-D expert stacks, AdamW parameters)."""
    matrices, stacks, others = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() == 2 and not _ADAMW_ONLY.search(name):
            matrices.append(p)
        elif p.dim() >= 3:
            stacks.append(p)
        else:
            others.append(p)
    return matrices, stacks, others


class CombinedOptimizer:
    """Several torch optimizers stepped together, with one learning-rate schedule over all their groups."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers
        for opt in optimizers:
            for group in opt.param_groups:
                group.setdefault("base_lr", group["lr"])

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def set_lr_factor(self, factor: float) -> None:
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * factor

    def state_dict(self) -> list[dict]:
        return [opt.state_dict() for opt in self.optimizers]

    def load_state_dict(self, states: list[dict]) -> None:
        if len(states) != len(self.optimizers):
            raise ValueError(f"optimizer state has {len(states)} parts, this run has {len(self.optimizers)}; "
                             "resume with the same --optimizer")
        for opt, state in zip(self.optimizers, states, strict=True):
            opt.load_state_dict(state)


NS_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.95), ns_dtype: str = "auto") -> CombinedOptimizer:
    """`muon`: BatchedMuon (hidden matrices and expert stacks) + AdamW (the rest); `adamw`: AdamW only.
    `ns_dtype`: Muon's Newton–Schulz precision, auto (see `BatchedMuon`), float32 or bfloat16."""
    if name not in OPTIMIZER_CHOICES:
        raise ValueError(f"unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZER_CHOICES)}")
    if ns_dtype not in NS_DTYPES:
        raise ValueError(f"unknown Newton–Schulz dtype {ns_dtype!r}; allowed: {', '.join(NS_DTYPES)}")
    matrices, stacks, others = split_parameters(model)
    if name == "adamw":
        params = matrices + stacks + others
        return CombinedOptimizer([torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)])
    optimizers: list[torch.optim.Optimizer] = []
    if matrices or stacks:
        optimizers.append(BatchedMuon(matrices + stacks, lr=lr, weight_decay=weight_decay,
                                      ns_dtype=NS_DTYPES[ns_dtype]))
    if others:
        optimizers.append(torch.optim.AdamW(others, lr=lr, betas=betas, weight_decay=0.0))
    return CombinedOptimizer(optimizers)


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.1) -> float:
    """Linear warmup to 1, then cosine decay to `min_ratio` at `total_steps` (`step` counts from 0)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
