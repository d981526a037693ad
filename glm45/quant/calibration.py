"""Calibration Hessians for GPTQ (`gptq.py`): H = Σ x xᵀ of the inputs that reach each quantized weight, from one
float forward per calibration record.

For a linear layer, the inputs of its forward; for a routed expert, the tokens routed to it and the SwiGLU product
they give its down projection (one [E, K, K] stack per expert weight); for the MTP layer, its forward over the same
text. This holds the whole model in memory in its compute dtype, with one K×K float32 Hessian per quantized weight
(per expert for the stacks): meant for models up to a few billion parameters, not GLM-4.5 itself, which would need
layer-by-layer calibration.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glm45.model.moe import Experts
from glm45.quant.scheme import QUANTIZED_WEIGHT
from glm45.train.losses import mtp_hidden

LOGIT_ROWS = 256  # hidden rows through a head at a time: at GLM-4.5's vocabulary, 155 MB of float32 logits


def collect_hessians(model, records) -> dict[str, torch.Tensor]:
    """{weight name: H = Σ x xᵀ over the inputs that reach it} ([K, K], or [E, K, K] for an expert stack) from one
    forward of the model (and its MTP layer) per record of token ids."""
    sums: dict[str, torch.Tensor] = {}

    def add(name: str, x: torch.Tensor, expert: int | None = None, experts: int = 0) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if expert is None:
            sums[name] = sums[name].addmm_(x.T, x) if name in sums else x.T @ x
        else:
            if name not in sums:
                sums[name] = torch.zeros(experts, x.shape[-1], x.shape[-1], device=x.device)
            sums[name][expert].addmm_(x.T, x)

    def expert_inputs(prefix: str, module: Experts, args) -> None:
        x, _, ids = args
        gate_up_proj, _ = module.weights()
        for expert in range(module.num_experts):
            rows = (ids == expert).any(-1)
            if not rows.any():
                continue
            routed = x[rows]
            gate, up = (routed @ gate_up_proj[expert].T).chunk(2, dim=-1)
            add(f"{prefix}.gate_up_proj", routed, expert, module.num_experts)
            add(f"{prefix}.down_proj", F.silu(gate) * up, expert, module.num_experts)

    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and QUANTIZED_WEIGHT.search(f"{name}.weight"):
            hooks.append(module.register_forward_pre_hook(lambda m, args, key=f"{name}.weight": add(key, args[0])))
        elif isinstance(module, Experts):
            hooks.append(module.register_forward_pre_hook(
                lambda m, args, prefix=name: expert_inputs(prefix, m, args)))
    try:
        with torch.no_grad():
            for record in records:
                ids = torch.tensor([record.input_ids], device=model.device)
                hidden = model.hidden_states(ids)
                for rows in hidden[0].split(LOGIT_ROWS):  # the heads' inputs, without a [T, vocab] tensor
                    model.compute_logits(rows)
                if model.mtp is not None and ids.shape[1] >= 2:
                    for rows in mtp_hidden(model, hidden, ids)[0].split(LOGIT_ROWS):
                        model.compute_mtp_logits(rows)
    finally:
        for hook in hooks:
            hook.remove()
    return sums
