"""A training-friendly forward for the routed experts, swapped in by the trainer without renaming weights.

`glm45.model.moe.Experts` writes each expert's output into a preallocated buffer by slice assignment; that is
ideal for inference, but in backward every slice assignment clones and zero-fills the whole buffer, which was
40% of a training step on CPU. `TrainingExperts` computes exactly the same function and parameters with the
per-expert outputs concatenated instead (one copy in forward, none extra in backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glm45.model.moe import Experts


class TrainingExperts(Experts):
    def forward(self, x_TD: torch.Tensor, topk_weights_TK: torch.Tensor, topk_ids_TK: torch.Tensor) -> torch.Tensor:
        _, top_k = topk_ids_TK.shape
        flat_ids = topk_ids_TK.reshape(-1)
        order = flat_ids.argsort(stable=True)
        token_of_row = order // top_k
        rows_per_expert = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        x_sorted = x_TD[token_of_row]
        outputs = []
        for expert, rows in enumerate(x_sorted.split(rows_per_expert)):
            if rows.shape[0] == 0:
                continue
            gate, up = F.linear(rows, self.gate_up_proj[expert]).chunk(2, dim=-1)
            outputs.append(F.linear(F.silu(gate) * up, self.down_proj[expert]))
        out_sorted = torch.cat(outputs)
        weights = topk_weights_TK.reshape(-1)[order, None]
        weighted = (out_sorted * weights).to(x_TD.dtype)
        return torch.zeros_like(x_TD).index_add_(0, token_of_row, weighted)


def use_training_experts(model: nn.Module) -> int:
    """Switch every `Experts` module of `model` to the training forward (same parameters); returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is Experts:
            module.__class__ = TrainingExperts
            count += 1
    return count
