"""LoRA: low-rank updates beside frozen weights, on linear layers, on the routed experts' fused stacks and on the
MTP layer, and merging them into the base weights. Saving and loading (PEFT's layout) is in `lora_io.py`.

A linear layer gets y = W x + b + (α/r) · B (A x), with A [r, in] initialised like PEFT (Kaiming-uniform) and
B [out, r] at zero, so training starts from the base model. A routed-expert stack W [E, out, in] (`gate_up_proj`,
`down_proj`) gets one pair of factors per expert, A [E, r, in] and B [E, out, r]: expert e computes with
W_e + (α/r) · B_e A_e. `LoRAExperts` hands the experts' forward (every dispatch path) those summed weights, so the
update costs one batched matmul [E, out, r] × [E, r, in] per forward — what PEFT's `target_parameters` does too —
which suits models whose expert stacks fit in memory twice; the stacks themselves are never copied or changed.

Targets are module names: the attention projections (`q_proj`, `k_proj`, `v_proj`, `o_proj`, the default),
`gate_proj`/`up_proj`/`down_proj` (dense MLPs and shared experts), `experts` (both routed-expert stacks) and
`eh_proj` (the MTP layer's input projection). With `mtp=True` the MTP layer's matching modules are adapted too,
so that its drafts follow a fine-tuned trunk; otherwise the MTP layer stays frozen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from glm45.model.moe import Experts

ALLOWED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "experts", "eh_proj")
# Attention only by default. With transformers 5, peft reads the names gate_proj/up_proj/down_proj as the routed
# experts (transformers 4 had them as linear layers) and drops them from the linear targets, so adapters on dense and
# shared-expert MLPs load in glm45 but not faithfully in peft; attention and `experts` adapters load in both.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_STACKS = ("gate_up_proj", "down_proj")


class LoRALinear(nn.Linear):
    """An nn.Linear (same `weight`/`bias` names) with a LoRA branch `lora_A`, `lora_B`."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device=base.weight.device, dtype=base.weight.dtype)
        self.base_class = type(base)  # merged back into the same kind of linear layer
        self.weight = base.weight
        self.bias = base.bias
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        update = self.lora_B(self.lora_A(self.dropout(x).to(self.lora_A.weight.dtype)))
        return out + (update * self.scaling).to(out.dtype)

    def delta(self) -> torch.Tensor:
        """(α/r)·B·A [out, in] in float32."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def merged(self) -> nn.Linear:
        """The original kind of linear layer with W + (α/r)·B·A."""
        linear = self.base_class(self.in_features, self.out_features, bias=self.bias is not None,
                                 device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_((self.weight.float() + self.delta()).to(self.weight.dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


class LoRAExperts(Experts):
    """A routed-expert module (same `gate_up_proj`/`down_proj` parameters) with per-expert low-rank factors
    `lora_A[stack]` [E, r, in] and `lora_B[stack]` [E, out, r] for the stacks in `stacks`."""

    def __init__(self, base: Experts, rank: int, alpha: float, stacks: Sequence[str] = EXPERT_STACKS):
        nn.Module.__init__(self)
        self.num_experts, self.intermediate_size = base.num_experts, base.intermediate_size
        self.sync_free = base.sync_free
        self.gate_up_proj, self.down_proj = base.gate_up_proj, base.down_proj
        self.scaling = alpha / rank
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for stack in stacks:
            num_experts, out_features, in_features = getattr(base, stack).shape
            device = getattr(base, stack).device
            a = torch.empty(num_experts, rank, in_features, device=device)
            for e in range(num_experts):  # PEFT's init: each expert's A like an nn.Linear(in, r)'s weight
                nn.init.kaiming_uniform_(a[e], a=math.sqrt(5))
            self.lora_A[stack] = nn.Parameter(a)
            self.lora_B[stack] = nn.Parameter(torch.zeros(num_experts, out_features, rank, device=device))

    def delta(self, stack: str) -> torch.Tensor:
        """(α/r)·B_e·A_e for every expert: [E, out, in] in float32."""
        return torch.bmm(self.lora_B[stack], self.lora_A[stack]) * self.scaling

    def weights(self):
        gate_up_proj, down_proj = super().weights()
        if not isinstance(gate_up_proj, torch.Tensor) or not isinstance(down_proj, torch.Tensor):
            raise ValueError("LoRA on routed experts needs unquantized expert weights")
        adapted = []
        for stack, weight in zip(EXPERT_STACKS, (gate_up_proj, down_proj), strict=True):
            adapted.append(weight + self.delta(stack).to(weight.dtype) if stack in self.lora_A else weight)
        return tuple(adapted)

    def merged(self) -> Experts:
        experts = Experts.__new__(Experts)
        nn.Module.__init__(experts)
        experts.num_experts, experts.intermediate_size = self.num_experts, self.intermediate_size
        experts.sync_free = self.sync_free
        with torch.no_grad():
            gate_up_proj, down_proj = self.weights()
            experts.gate_up_proj = nn.Parameter(gate_up_proj.detach().clone())
            experts.down_proj = nn.Parameter(down_proj.detach().clone())
        return experts


def _adaptable(model: nn.Module, targets: Sequence[str], mtp: bool, main: bool) -> list[str]:
    names = []
    for name, module in model.named_modules():
        if not (mtp if name.startswith("mtp.") else main):
            continue
        last = name.split(".")[-1]
        if isinstance(module, Experts) and not isinstance(module, LoRAExperts):
            if "experts" in targets:
                names.append(name)
        elif isinstance(module, nn.Linear) and not isinstance(module, LoRALinear) and last in targets:
            names.append(name)
    return names


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: Sequence[str] = DEFAULT_TARGETS,
               dropout: float = 0.0, mtp: bool = False, main: bool = True) -> list[str]:
    """Freeze the model and put LoRA branches on the target modules of its main stack (`main`) and of its MTP layer
    (`mtp`); returns their names."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank}")
    unknown = [t for t in targets if t not in ALLOWED_TARGETS]
    if unknown:
        raise ValueError(f"unknown LoRA target modules {unknown}; allowed: {', '.join(ALLOWED_TARGETS)}")
    if "experts" in targets and dropout > 0:
        raise ValueError("LoRA dropout cannot apply to routed experts (as in PEFT); use --lora-dropout 0")
    if mtp and getattr(model, "mtp", None) is None:
        raise ValueError("LoRA on the MTP layer was asked for, but the model has no MTP layer")
    names = _adaptable(model, targets, mtp, main)
    if not names:
        raise ValueError(f"the model has no modules named {list(targets)} to adapt")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        module = model.get_submodule(name)
        adapted = LoRAExperts(module, rank, alpha) if isinstance(module, Experts) else \
            LoRALinear(module, rank, alpha, dropout)
        _set_module(model, name, adapted)
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear | LoRAExperts]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear | LoRAExperts)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA branch into its module (in place) and make all parameters trainable again."""
    for name, module in lora_modules(model).items():
        _set_module(model, name, module.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model
