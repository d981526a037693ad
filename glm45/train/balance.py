"""MoE training terms: loss-free expert balancing, expert-load statistics and the sequence-level balance loss.

GLM-4.5 (like DeepSeek-V3) balances its experts without an auxiliary loss: every router has a bias that is
used only to *choose* experts (`e_score_correction_bias`), and after each optimizer step the bias of an
expert that got more than the mean load goes down by γ, that of an under-used one up by γ:

    bias_e ← bias_e + γ · sign(mean_load − load_e)

A small optional sequence-level balance loss (DeepSeek-V3's, weight α) guards against imbalance inside one
sequence: α · Σ_e f_e · P_e with f_e = E/(K·T) · #{t: e ∈ topk_t} and P_e = mean_t s_{t,e} / Σ_e' s_{t,e'}.

Nothing here changes the model: `RouterMonitor` puts forward hooks on its `Router` modules, which return
(topk_weights_TK, topk_ids_TK, scores_TE), and counts only real (non-padding) tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from glm45.model.moe import Router


def load_imbalance(loads: dict[str, torch.Tensor]) -> dict[str, float]:
    """max/mean of each router's expert loads (1.0 is perfect balance; nan when nothing was routed)."""
    return {name: float(load.max() / load.mean()) if load.sum() > 0 else float("nan") for name, load in loads.items()}


class RouterMonitor:
    """Collects per-router expert loads (and the optional sequence balance loss) during forward passes."""

    def __init__(self, model: nn.Module, seq_aux_weight: float = 0.0):
        if seq_aux_weight < 0:
            raise ValueError(f"the sequence balance loss weight must be >= 0, got {seq_aux_weight}")
        self.seq_aux_weight = seq_aux_weight
        self.routers: dict[str, Router] = {n: m for n, m in model.named_modules() if isinstance(m, Router)}
        self.loads = {name: torch.zeros(r.e_score_correction_bias.numel()) for name, r in self.routers.items()}
        self.aux_loss: torch.Tensor | None = None
        self.token_mask: torch.Tensor | None = None  # [B, T] True on real tokens
        self.recording = True
        self._handles = [r.register_forward_hook(self._make_hook(name)) for name, r in self.routers.items()]

    def _rows_mask(self, num_rows: int) -> tuple[torch.Tensor | None, int]:
        """The real-token mask for a router call over `num_rows` flattened rows, and the sequence count.

        The main layers route B·T rows; the MTP layer routes B·(T−1) rows for the pairs (h_t, x_{t+1}),
        real when x_{t+1} is."""
        mask = self.token_mask
        if mask is None:
            return None, 1
        if num_rows == mask.numel():
            return mask, mask.shape[0]
        if num_rows == mask.shape[0] * (mask.shape[1] - 1):
            return mask[:, 1:], mask.shape[0]
        return None, 1

    def _make_hook(self, name: str):
        def hook(module: Router, inputs, outputs) -> None:
            if not self.recording:
                return
            _, topk_ids_TK, scores_TE = outputs
            num_experts = scores_TE.shape[-1]
            mask, num_seqs = self._rows_mask(topk_ids_TK.shape[0])
            ids = topk_ids_TK if mask is None else topk_ids_TK[mask.reshape(-1)]
            self.loads[name] += torch.bincount(ids.reshape(-1).cpu(), minlength=num_experts).float()
            if self.seq_aux_weight > 0:
                term = self._sequence_balance_loss(scores_TE, topk_ids_TK, mask, num_seqs, module.top_k)
                self.aux_loss = term if self.aux_loss is None else self.aux_loss + term
        return hook

    def _sequence_balance_loss(self, scores_TE: torch.Tensor, topk_ids_TK: torch.Tensor,
                               mask: torch.Tensor | None, num_seqs: int, top_k: int) -> torch.Tensor:
        num_experts = scores_TE.shape[-1]
        scores = scores_TE.view(num_seqs, -1, num_experts)
        chosen = torch.zeros_like(scores).scatter_(-1, topk_ids_TK.view(num_seqs, -1, top_k), 1.0)
        weights = torch.ones(scores.shape[:2], device=scores.device) if mask is None else mask.float()
        tokens = weights.sum(dim=1).clamp(min=1)  # [B]
        f = num_experts / top_k * (chosen * weights[..., None]).sum(dim=1) / tokens[:, None]
        normalised = scores / scores.sum(dim=-1, keepdim=True)
        p = (normalised * weights[..., None]).sum(dim=1) / tokens[:, None]
        return self.seq_aux_weight * (f.detach() * p).sum(dim=-1).mean()

    def take_aux_loss(self) -> torch.Tensor | None:
        """The balance loss accumulated since the last call (None when disabled)."""
        loss, self.aux_loss = self.aux_loss, None
        return loss

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No recording inside (gradient-checkpointing recomputation in backward, evaluation)."""
        previous, self.recording = self.recording, False
        try:
            yield
        finally:
            self.recording = previous

    def load_stats(self) -> dict[str, float]:
        """max/mean expert load per router since the last reset."""
        return load_imbalance(self.loads)

    def reset(self) -> None:
        for load in self.loads.values():
            load.zero_()

    @torch.no_grad()
    def update_biases(self, gamma: float) -> None:
        """Loss-free balancing: bias_e += γ·sign(mean_load − load_e) with the loads since the last reset."""
        if gamma < 0:
            raise ValueError(f"the balancing rate gamma must be >= 0, got {gamma}")
        if gamma == 0:
            return
        for name, router in self.routers.items():
            load = self.loads[name]
            if load.sum() == 0:
                continue
            step = gamma * torch.sign(load.mean() - load)
            router.e_score_correction_bias += step.to(router.e_score_correction_bias.device)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
