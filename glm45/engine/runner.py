"""The model runner: one engine step on the model for a scheduled batch of sequences.

For each scheduled sequence the step covers its next `num_tokens` known tokens (a prefill chunk, or the
one pending token of a decode), plus its MTP drafts when it is decoding speculatively. The runner builds
the flat inputs, positions and slot mapping, has the executor run the target model's cached forward,
samples or verifies, appends the new tokens to the sequences, and then has the MTP layer draft for the
next step. The runner never touches the model itself: the executor (one process, or rank 0 of a
tensor-parallel group) does, from the plain inputs the runner builds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glm45.engine.attention import SeqSlice
from glm45.engine.executor import ModelExecutor, StepInputs
from glm45.engine.kv_cache import BlockManager
from glm45.engine.sampler import Sampler, top_logprobs
from glm45.engine.sequence import Sequence
from glm45.engine.speculative import AcceptanceStats, choose_draft, verify


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # known tokens to compute this step (drafts come on top)


class ModelRunner:
    def __init__(self, executor: ModelExecutor, block_manager: BlockManager, max_model_len: int,
                 num_speculative_tokens: int = 0):
        self.executor = executor
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.k = num_speculative_tokens if executor.has_mtp else 0
        self.sampler = Sampler()
        self.stats = AcceptanceStats(max(self.k, 1))

    def _slots(self, seq: Sequence, start: int, count: int) -> list[int]:
        return [self.block_manager.slot(seq, p) for p in range(start, start + count)]

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSeq]) -> None:
        ids, positions, slots, slices = [], [], [], []
        plan = []  # (seq, start, num_tokens, drafts, q_start)
        for item in batch:
            seq, start = item.seq, item.seq.num_computed_tokens
            ends_known = start + item.num_tokens == len(seq)
            drafts = list(seq.draft_token_ids) if ends_known and item.num_tokens == 1 else []
            tokens = seq.token_ids[start:start + item.num_tokens] + drafts
            plan.append((seq, start, item.num_tokens, drafts, len(ids)))
            slices.append(SeqSlice(len(ids), len(tokens), start + len(tokens), seq.block_table))
            ids += tokens
            positions += range(start, start + len(tokens))
            slots += self._slots(seq, start, len(tokens))

        # Logits only where something is sampled: the last known token, and every draft position.
        logit_rows, owners = [], []
        for seq, start, num_tokens, drafts, q_start in plan:
            if start + num_tokens == len(seq):
                owners.append((seq, len(logit_rows), len(drafts)))
                logit_rows += range(q_start + num_tokens - 1, q_start + num_tokens + len(drafts))
        logits = self.executor.forward(StepInputs(ids, positions, slots, slices), logit_rows)

        plain = [(seq, row) for seq, row, num_drafts in owners if num_drafts == 0]
        new_tokens: dict[int, list[tuple[int, dict | None]]] = {}
        if plain:
            sampled = self.sampler(logits[[row for _, row in plain]], [seq for seq, _ in plain])
            for (seq, _), result in zip(plain, sampled, strict=True):
                new_tokens[seq.seq_id] = [result]
        for seq, row, num_drafts in owners:
            if num_drafts:
                rows = logits[row:row + num_drafts + 1]
                tokens = verify(rows, seq)
                self.stats.record(num_drafts, len(tokens))
                seq.num_draft_tokens += num_drafts
                seq.num_accepted_tokens += min(num_drafts, len(tokens) - 1)
                k = seq.params.logprobs
                new_tokens[seq.seq_id] = [
                    (t, None if k is None else top_logprobs(rows[i], t, k)) for i, t in enumerate(tokens)
                ]

        # Advance the sequences: K/V is valid for the known tokens and for each accepted draft.
        drafting = []
        for seq, start, num_tokens, drafts, q_start in plan:
            accepted = new_tokens.get(seq.seq_id, [])
            num_valid = num_tokens + max(0, len(accepted) - 1) if drafts else num_tokens
            seq.num_computed_tokens = start + num_valid
            seq.draft_token_ids, seq.draft_probs = [], None
            for token, logprobs in accepted:
                seq.append_token(token, self.max_model_len, logprobs)
                if seq.is_finished:
                    break
            self.block_manager.register_computed_blocks(seq)
            if self.k and not seq.is_finished:
                drafting.append((seq, start, num_valid, q_start))
        if drafting:
            self._draft(drafting)

    def _draft(self, items: list[tuple[Sequence, int, int, int]]) -> None:
        """MTP over the pairs (h_t, x_{t+1}) computed this step; then k draft tokens for decoding sequences."""
        ids, positions, slots, slices, rows = [], [], [], [], []
        for seq, start, num_valid, q_start in items:
            slices.append(SeqSlice(len(ids), num_valid, start + num_valid, seq.block_table))
            ids += seq.token_ids[start + 1:start + num_valid + 1]
            positions += range(start, start + num_valid)
            slots += self._slots(seq, start, num_valid)
            rows += range(q_start, q_start + num_valid)
        # Every pair gets its MTP K/V; logits only at the last pair of sequences that decode next step.
        decoding = [(i, seq) for i, (seq, *_rest) in enumerate(items) if not seq.in_prefill]
        last_rows = [slices[i].q_start + slices[i].q_len - 1 for i, _ in decoding]
        logits = self.executor.draft(StepInputs(ids, positions, slots, slices), rows, last_rows)
        if not decoding:
            return
        seqs = [seq for _, seq in decoding]
        draft_probs: list[list[torch.Tensor | None]] = [[] for _ in seqs]
        for step in range(self.k):
            tokens = []
            for b, seq in enumerate(seqs):
                token, q = choose_draft(logits[b], seq)
                seq.draft_token_ids.append(token)
                draft_probs[b].append(q)
                tokens.append(token)
            if step == self.k - 1:
                break
            # The pair (h', d_j) sits at position n + j - 1, where n is the pending token's position.
            pos = [len(seq) - 1 + step for seq in seqs]
            slices = [SeqSlice(b, 1, p + 1, seq.block_table) for b, (seq, p) in enumerate(zip(seqs, pos, strict=True))]
            slots = [self.block_manager.slot(seq, p) for seq, p in zip(seqs, pos, strict=True)]
            logits = self.executor.draft(StepInputs(tokens, pos, slots, slices), None, list(range(len(seqs))))
        for seq, probs in zip(seqs, draft_probs, strict=True):
            seq.draft_probs = None if seq.params.greedy else torch.stack(probs)
