"""Expert parallelism: each rank of the group holds a contiguous slice of the routed experts.

Routing is unchanged: the router is replicated and sees the same (replicated) activations on every rank,
so every rank computes the same top-k choice as the single-device model. Dispatch needs no message because
every rank already holds every token; each rank runs the (token, expert) assignments that fall in its slice,
and the combine is a sum over ranks — the same all-reduce that also sums the tensor-parallel shared
expert, so an MoE block still costs one all-reduce.

With replicated activations this is the correct and simplest dispatch on any backend (gloo included). An
all-to-all dispatch pays off only when the ranks hold *different* tokens (data-parallel attention), which
this stack does not do.
"""

from __future__ import annotations

import torch
from torch import nn

from glm45.distributed import ParallelGroup
from glm45.model.moe import Experts
from glm45.model.shard import ShardSpec


class ExpertParallelExperts(Experts):
    """Experts `first_expert … first_expert + num_experts - 1` of a layer's `num_total_experts`; the others live on
    other ranks.

    The local stacks keep the parameter names of `Experts` (checkpoint names map unchanged) and its grouped
    computation, run on the assignments routed to them only. The output is this rank's part of the routed sum."""

    def __init__(self, experts: Experts, group: ParallelGroup):
        nn.Module.__init__(self)
        self.num_total_experts = experts.num_experts
        if self.num_total_experts % group.size:
            raise ValueError(f"n_routed_experts ({self.num_total_experts}) must be divisible by the expert-parallel "
                             f"size ({group.size}); choose a tensor_parallel_size that divides it")
        self.shard = ShardSpec(dim=0, num_shards=group.size, index=group.rank)
        self.num_experts = self.num_total_experts // group.size
        self.first_expert = group.rank * self.num_experts
        self.intermediate_size = experts.intermediate_size
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(experts, name)
            setattr(self, name, nn.Parameter(self.shard.slice(full.detach()).clone(), requires_grad=full.requires_grad))

    def forward(self, x_TD: torch.Tensor, topk_weights_TK: torch.Tensor, topk_ids_TK: torch.Tensor) -> torch.Tensor:
        top_k = topk_ids_TK.shape[1]
        local_ids_R = topk_ids_TK.reshape(-1) - self.first_expert
        rows_R = ((local_ids_R >= 0) & (local_ids_R < self.num_experts)).nonzero().squeeze(1)
        out_TD = torch.zeros_like(x_TD)
        if rows_R.numel() == 0:
            return out_TD
        token_R = rows_R // top_k
        # Each local assignment runs as a "token" with one expert; the rows then go back to their tokens.
        routed_RD = super().forward(x_TD[token_R], topk_weights_TK.reshape(-1)[rows_R, None],
                                    local_ids_R[rows_R, None])
        return out_TD.index_add_(0, token_R, routed_RD)

    def extra_repr(self) -> str:
        return f"experts {self.first_expert}…{self.first_expert + self.num_experts - 1} of {self.num_total_experts}"


def partition_experts(experts: Experts, group: ParallelGroup) -> tuple[ExpertParallelExperts, dict[str, ShardSpec]]:
    """This rank's slice of a layer's experts (parameters cut along the expert dimension, meta or real) and the
    shard specs of its parameters, named relative to the returned module."""
    module = ExpertParallelExperts(experts, group)
    return module, {"gate_up_proj": module.shard, "down_proj": module.shard}
