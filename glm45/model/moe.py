"""The mixture-of-experts feed-forward of GLM-4.5: sigmoid router with a selection-only bias, grouped
top-k, routed experts computed by grouping tokens per expert, and an always-on shared expert.

Shape suffixes: T tokens, D hidden size, E routed experts, K experts per token, G expert groups,
I expert intermediate size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glm45.config import ModelConfig
from glm45.kernels import cpu, prefill
from glm45.model.layers import MLP
from glm45.quant.modules import expert_weight


class Router(nn.Module):
    """Chooses K experts per token and their weights.

    scores = sigmoid(x·Wᵀ) in float32. Selection uses scores + e_score_correction_bias (the loss-free
    balancing bias), restricted to the `topk_group` best of `n_group` groups, where a group's score is
    the sum of its two best biased scores. The weights are the *unbiased* scores of the chosen experts,
    renormalised to sum to 1 when `norm_topk_prob`, then multiplied by `routed_scaling_factor`.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size, dtype=torch.float32))
        self.register_buffer(
            "e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32), persistent=True
        )

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (topk_weights_TK float32, topk_ids_TK, scores_TE float32)."""
        logits_TE = F.linear(x_TD.float(), self.weight.float())
        scores_TE = logits_TE.sigmoid()
        choice_TE = scores_TE + self.e_score_correction_bias
        if self.n_group > 1:
            num_tokens, num_experts = choice_TE.shape
            choice_TGe = choice_TE.view(num_tokens, self.n_group, num_experts // self.n_group)
            group_scores_TG = choice_TGe.topk(2, dim=-1).values.sum(dim=-1)
            top_groups_TG = group_scores_TG.topk(self.topk_group, dim=-1, sorted=False).indices
            keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, top_groups_TG, True)
            choice_TE = choice_TGe.masked_fill(~keep_TG[..., None], float("-inf")).view(num_tokens, num_experts)
        topk_ids_TK = choice_TE.topk(self.top_k, dim=-1, sorted=False).indices
        topk_weights_TK = scores_TE.gather(1, topk_ids_TK)
        if self.norm_topk_prob:
            topk_weights_TK = topk_weights_TK / (topk_weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_weights_TK * self.routed_scaling_factor, topk_ids_TK, scores_TE


class Experts(nn.Module):
    """E SwiGLU experts stored as stacked weights: gate_up_proj [E, 2I, D] (gate rows first), down_proj
    [E, D, I] — the layout transformers 5 uses, so fused checkpoints load without copies.

    Tokens are grouped by expert: the T·K (token, expert) assignments are sorted by expert once, then each
    active expert runs one matmul over its contiguous slice. No per-token loops, no per-token weight gathers.
    On GPUs (`sync_free`, set by the model runner) the slices go to one grouped GEMM per projection
    (`torch._grouped_mm`, FP8: `torch._scaled_grouped_mm`) with offsets computed on the device: no host sync,
    a launch count that does not depend on how many experts are active, and fixed shapes for CUDA graphs.
    """

    sync_free = False  # the grouped-GEMM dispatch (GPUs); the model runner sets it per module
    GROUP_ALIGN = 16   # rows of each expert's group padded to this (the grouped GEMM kernels' alignment)

    def __init__(self, config: ModelConfig):
        super().__init__()
        num_experts, hidden, inter = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts = num_experts
        self.intermediate_size = inter
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter))

    def forward(self, x_TD: torch.Tensor, topk_weights_TK: torch.Tensor, topk_ids_TK: torch.Tensor) -> torch.Tensor:
        num_tokens, top_k = topk_ids_TK.shape
        if self.sync_free and not torch.is_grad_enabled():
            return self._grouped(x_TD, topk_weights_TK, topk_ids_TK)
        if num_tokens <= cpu.MAX_KERNEL_ROWS:
            decoded = self._decode(x_TD, topk_weights_TK, topk_ids_TK)
            if decoded is not None:
                return decoded
        flat_ids = topk_ids_TK.reshape(-1)
        order = flat_ids.argsort(stable=True)
        token_of_row = order // top_k
        rows_per_expert = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        gate_up_proj, down_proj = self.weights()
        if not torch.is_grad_enabled():
            return self._by_expert(x_TD, topk_weights_TK.reshape(-1)[order], token_of_row, rows_per_expert,
                                   gate_up_proj, down_proj)
        # Training: per-expert outputs are concatenated rather than written into a preallocated buffer: in backward
        # every slice assignment would clone and zero-fill the whole buffer.
        outputs = []
        for expert, rows in enumerate(x_TD[token_of_row].split(rows_per_expert)):
            if rows.shape[0]:
                gate, up = cpu.linear(rows, gate_up_proj[expert]).chunk(2, dim=-1)
                outputs.append(cpu.linear(F.silu(gate) * up, down_proj[expert]))
        out_sorted = torch.cat(outputs)

        # Weighting in float32 then casting back matches the reference's rounding.
        weights = topk_weights_TK.reshape(-1)[order, None]
        weighted = (out_sorted * weights).to(x_TD.dtype)
        return torch.zeros_like(x_TD).index_add_(0, token_of_row, weighted)

    def _by_expert(self, x_TD: torch.Tensor, weights: torch.Tensor, token_of_row: torch.Tensor,
                   rows_per_expert: list[int], gate_up_proj, down_proj) -> torch.Tensor:
        """Inference over many tokens: each expert gathers its tokens, runs, weights its outputs and adds them into
        the result while they are in cache — the same sums in the same order as the training path's, without its
        passes over all T·K rows at once (which took most of an Air-shaped prefill step). A bf16 model's experts
        (plain or packed) run all of it in one call of the kernels instead (`prefill.routed_experts`)."""
        fused = prefill.routed_experts(x_TD, gate_up_proj, down_proj, token_of_row, weights, rows_per_expert)
        if fused is not None:
            return fused
        out = torch.zeros_like(x_TD)
        for expert, (tokens, w) in enumerate(zip(token_of_row.split(rows_per_expert), weights.split(rows_per_expert),
                                                 strict=True)):
            if tokens.shape[0]:
                gate, up = cpu.linear(x_TD[tokens], gate_up_proj[expert]).chunk(2, dim=-1)
                y = cpu.linear(F.silu(gate) * up, down_proj[expert])
                out.index_add_(0, tokens, (y * w[:, None]).to(x_TD.dtype))  # float32 weighting, as in training
        return out

    def _grouped(self, x_TD: torch.Tensor, topk_weights_TK: torch.Tensor, topk_ids_TK: torch.Tensor) -> torch.Tensor:
        """The assignments sorted by expert into groups padded to GROUP_ALIGN rows, one grouped GEMM per
        projection, weighted and summed back per token — all on the device, in fixed shapes."""
        from glm45.quant import cuda as grouped

        T, K = topk_ids_TK.shape
        E, align = self.num_experts, self.GROUP_ALIGN
        flat = topk_ids_TK.reshape(-1)
        order = flat.argsort(stable=True)                                      # assignments by expert
        counts = torch.zeros(E, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
        padded = (counts + align - 1) // align * align
        ends = padded.cumsum(0)
        starts = ends - padded                                                 # each group's first padded row
        first = counts.cumsum(0) - counts                                      # … and its first sorted row
        expert_sorted = flat[order]
        rank = torch.arange(T * K, device=flat.device) - first[expert_sorted]  # position inside the group
        row = starts[expert_sorted] + rank                                     # padded row of each assignment
        rows = T * K + E * (align - 1)                                         # enough for any routing
        x_rows = x_TD.new_zeros(rows, x_TD.shape[1]).index_copy_(0, row, x_TD[order // K])
        offsets = ends.to(torch.int32)
        gate_up_proj, down_proj = self.weights()
        gate, up = grouped.grouped_mm(x_rows, gate_up_proj, offsets).chunk(2, dim=-1)
        out_rows = grouped.grouped_mm(F.silu(gate) * up, down_proj, offsets)
        weighted = out_rows[row].float() * topk_weights_TK.reshape(-1)[order, None]
        return torch.zeros_like(x_TD, dtype=torch.float32).index_add_(0, order // K, weighted).to(x_TD.dtype)

    def weights(self):
        """(gate_up_proj, down_proj): plain tensors, or `PackedWeight`s when the model is quantized."""
        return expert_weight(self, "gate_up_proj"), expert_weight(self, "down_proj")

    def _decode(self, x_TD: torch.Tensor, topk_weights_TK: torch.Tensor, topk_ids_TK: torch.Tensor):
        """A handful of tokens (decoding): no sorting, every (token, expert) pair in one grouped call per
        projection; the K expert outputs of a token are summed in float32. None when the kernel cannot run."""
        num_tokens, top_k = topk_ids_TK.shape
        gate_up_proj, down_proj = self.weights()
        x_rows = x_TD.repeat_interleave(top_k, dim=0)
        expert_of_row = topk_ids_TK.reshape(-1)
        gate_up = cpu.grouped_linear(x_rows, gate_up_proj, expert_of_row)
        if gate_up is None:
            return None
        gate, up = gate_up.chunk(2, dim=-1)
        out_rows = cpu.grouped_linear(F.silu(gate) * up, down_proj, expert_of_row)
        out_TKD = out_rows.view(num_tokens, top_k, -1).float() * topk_weights_TK[..., None]
        return out_TKD.sum(dim=1).to(x_TD.dtype)


class MoE(nn.Module):
    """Routed experts (weighted) plus the shared expert (unweighted)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Router(config)
        self.experts = Experts(config)
        self.shared_experts = MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_TD = x.reshape(-1, x.shape[-1])
        topk_weights_TK, topk_ids_TK, _ = self.gate(x_TD)
        routed_TD = self.experts(x_TD, topk_weights_TK, topk_ids_TK)
        return (routed_TD + self.shared_experts(x_TD)).view_as(x)
