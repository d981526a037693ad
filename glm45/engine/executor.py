"""The model's side of an engine step: forward passes over the paged KV cache, from plain inputs.

The runner decides *what* to compute (token ids, positions, slot mapping, per-sequence slices, which rows
need logits) and does all the sampling; the executor owns the model and its KV cache and computes. The split
exists for tensor parallelism: every rank runs an executor over its own shard of the model and of the KV
cache, and rank 0 forwards each call's plain inputs to the others (glm45/parallel/workers.py), so the
scheduler, the sequences and the sampler live only on rank 0.

The hidden states of one step stay here between its calls: the target forward keeps its final hidden
states, the first MTP draft reads rows of them, and each later draft step carries the previous one's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from glm45.engine.attention import PagedAttention, SeqSlice


@dataclass
class StepInputs:
    """The flat tokens of one forward over the cache, sequence after sequence."""

    token_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    slices: list[SeqSlice] = field(default_factory=list)


class ModelExecutor:
    def __init__(self, model, kv_cache: torch.Tensor, block_size: int):
        self.model = model
        self.kv_cache = kv_cache  # [layers, 2, blocks, block_size, local kv heads, head_dim]
        self.block_size = block_size
        self.device = model.device
        self.hidden: torch.Tensor | None = None        # the last target forward's final hidden states [N, D]
        self.draft_hidden: torch.Tensor | None = None  # the last MTP step's normalised h' at its logit rows

    @property
    def has_mtp(self) -> bool:
        return self.model.mtp is not None

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _context(self, inputs: StepInputs) -> PagedAttention:
        return PagedAttention(self.kv_cache, self._tensor(inputs.slot_mapping), inputs.slices, self.block_size)

    @torch.inference_mode()
    def forward(self, inputs: StepInputs, logit_rows: list[int]) -> torch.Tensor | None:
        """The target model over `inputs` (its K/V written to the cache) → float32 logits at `logit_rows`."""
        ctx = self._context(inputs)
        self.hidden = self.model.hidden_states(self._tensor(inputs.token_ids), self._tensor(inputs.positions), ctx)
        if not logit_rows:
            return None
        return self.model.compute_logits(self.hidden[self._tensor(logit_rows)]).float()

    @torch.inference_mode()
    def draft(self, inputs: StepInputs, hidden_rows: list[int] | None, logit_rows: list[int]) -> torch.Tensor | None:
        """One MTP step over `inputs` (its K/V written to the MTP layer's cache) → float32 logits at `logit_rows`.

        The hidden input pairs with each token: rows `hidden_rows` of the last target forward, or, when None,
        the previous draft step's h' (one row per token, in order). The new h' is kept at `logit_rows`."""
        source = self.draft_hidden if hidden_rows is None else self.hidden[self._tensor(hidden_rows)]
        h = self.model.mtp_hidden_states(self._tensor(inputs.token_ids), source, self._tensor(inputs.positions),
                                         self._context(inputs))
        if not logit_rows:
            self.draft_hidden = None
            return None
        self.draft_hidden = h[self._tensor(logit_rows)]
        return self.model.compute_mtp_logits(self.draft_hidden).float()
