"""The host side of MTP's one-program step (k = 1 on the captured CPU step): whether a batch takes it, its rows
[x_n, d] and each sampled sequence's uniforms, the constraint masks of its verify rows, and what it returns — each
sequence's tokens and its next draft — for one step (`ModelRunner.draft_step`) or a run of them in one call
(`draft_step_run`). The tokens and drafts are those of verification followed by `Executor.propose_drafts`."""

from __future__ import annotations

import torch

from glm45.engine.attention import SeqSlice, StepInputs
from glm45.engine.block_manager import BlockManager
from glm45.engine.logits import allows, follow, mask_for, state_after
from glm45.engine.sampler import host_row, host_uniforms
from glm45.engine.scheduler import ScheduledSeq, SeqResult, StepResult
from glm45.engine.sequence import Sequence
from glm45.engine.speculative import AcceptanceStats, choose_drafts
from glm45.engine.step_runs import RunPlanner, decodes_plainly
from glm45.grammar import masks

# (seq, positions with MTP K/V, its next draft, the draft's distribution or None for greedy)
Drafted = tuple[Sequence, int, int, "torch.Tensor | None"]


class DraftSteps:
    def __init__(self, runner, block_manager: BlockManager, runs: RunPlanner, stats: AcceptanceStats, k: int,
                 max_model_len: int | None):
        self.runner, self.block_manager, self.runs, self.stats = runner, block_manager, runs, stats
        self.k, self.max_model_len = k, max_model_len
        # {seq_id: (tokens its constraint has accepted, restriction, bitmask row)}: the mask the last step computed
        # for a constrained sequence's next token, which is the next step's first verify row's
        self.next_masks: dict[int, tuple] = {}

    def applies(self, batch: list[ScheduledSeq]) -> bool:
        """Whether the step is MTP with one draft for every sequence and nothing else asked of its logits (no
        penalty, bias, log-probabilities or adapter), on a runner with the one-program draft step. A constraint
        may stand anywhere but at the start of a call's name (chosen whole, by its own forwards)."""
        if self.k != 1 or not getattr(self.runner, "runs_draft_step", None) \
                or not self.runner.runs_draft_step(2 * len(batch)):
            return False
        for item in batch:
            seq = item.seq
            if not decodes_plainly(item) or len(seq.draft_token_ids) != 1 \
                    or (not seq.params.greedy and seq.draft_probs is None):
                return False
            if seq.constraint is not None and seq.constraint.name_choices() is not None:
                return False
        return True

    def step(self, batch: list[ScheduledSeq]) -> tuple[StepResult, list[Drafted]]:
        """The step of `applies` in one program: the same tokens, and the same next drafts, as verification followed
        by `propose_drafts`. A sampled sequence's uniforms are taken from its stream in the same order (four for
        verification, one for the next draft). A constraint's masks for the two verify rows are known before the
        step (the second row follows the draft); the next draft's, only after it: where the state after the new
        tokens restricts, the draft is chosen again here from its masked logits."""
        token_masks, after_draft = {}, {}
        vocab = self.runner.model.config.vocab_size
        bitmask = masks.allocate(2 * len(batch), vocab) if any(item.seq.constraint for item in batch) else None
        known, self.next_masks = self.next_masks, {}
        for b, item in enumerate(batch):
            if item.seq.constraint is not None:
                after_draft[b] = self._verify_masks(item.seq, bitmask, 2 * b, token_masks, known.get(item.seq.seq_id))
        inputs, sampled = self._rows(batch, 1)
        targets, accepted, drafts, q, draft_logits = self.runner.draft_step(inputs, sampled, token_masks)
        results, drafted = {}, []
        for b, item in enumerate(batch):
            seq, start, row = item.seq, item.seq.num_computed_tokens, 2 * b
            tokens = targets[row:row + 1 + accepted[b]]
            draft, probs = drafts[row + len(tokens) - 1], q[b:b + 1].clone() if b in sampled else None
            if seq.constraint is not None:
                # tokens[0] is the draft when it was accepted (or drawn again), and then a call's name may start
                # after it: the next step chooses the name whole (`until_name_start`), so the step stops there.
                after = after_draft[b] if tokens[0] == seq.draft_token_ids[0] else None
                truncated = len(tokens) == 2 and after is not None and after.name_choices() is not None
                if truncated:
                    tokens = tokens[:1]
                state = state_after(seq, tokens) if after is None else \
                    follow(after, seq, tokens[1]) if len(tokens) == 2 else after
                draft, probs, restriction = self._constrained_draft(
                    seq, state, bitmask[row], draft_logits[row + len(tokens) - 1],
                    sampled[b][1][4] if b in sampled else None, truncated, draft, probs)
                self.next_masks[seq.seq_id] = (state.num_tokens, restriction, bitmask[row])
            self.stats.record(1, len(tokens))
            # K/V (target's and MTP's) is valid for the pending token and an accepted draft; the next draft comes
            # from the last valid pair.
            results[seq.seq_id] = SeqResult(tokens, [None] * len(tokens), start + len(tokens), 1, [])
            drafted.append((seq, start + len(tokens), draft, probs))
        return StepResult(results), drafted

    def run(self, batch: list[ScheduledSeq], steps: int) -> tuple[StepResult, list[Drafted]]:
        """`steps` steps of `step` (no constraints) in one call of the runner, each sequence's uniforms taken from
        its stream in the order those steps take them. A sequence keeps the steps up to the one whose tokens finish
        it (its end token, `max_tokens`, the context): what it was given then is what single steps would have given
        it, acceptance counts included."""
        inputs, sampled = self._rows(batch, steps)
        per_step, drafts, q = self.runner.draft_step_run(inputs, steps, sampled,
                                                         [self.runs.until(item.seq) for item in batch])
        results, drafted = {}, []
        for b, item in enumerate(batch):
            seq, start = item.seq, item.seq.num_computed_tokens
            tokens, kept = [], 0
            for step_tokens in per_step[b]:
                tokens += step_tokens
                kept += 1
                self.stats.record(1, len(step_tokens))
                if seq.finishes_within(tokens, self.max_model_len, len(tokens) - len(step_tokens)):
                    break
            # K/V (target's and MTP's) is valid up to the pending token, as after single steps
            valid = start + len(tokens)
            results[seq.seq_id] = SeqResult(tokens, [None] * len(tokens), valid, kept, [], len(tokens) - kept)
            drafted.append((seq, valid, drafts[b], q[b:b + 1].clone() if b in sampled else None))
        return StepResult(results), drafted

    def _rows(self, batch: list[ScheduledSeq], steps: int) -> tuple[StepInputs, dict]:
        """The rows [x_n, d] of each sequence for `steps` one-program MTP steps, and each sampled sequence's entry:
        its `SampleRow` fields, 5 uniforms a step from its stream (four for verification, one for the next draft,
        in the order the separate path takes them), and the distribution its draft was drawn from."""
        ids, positions, slots, slices, sampled = [], [], [], [], {}
        vocab = self.runner.model.config.vocab_size
        for b, item in enumerate(batch):
            seq, start = item.seq, item.seq.num_computed_tokens
            slices.append(SeqSlice(len(ids), 2, start + 2, seq.block_table, seq.seq_id))
            ids += [seq.token_ids[start], seq.draft_token_ids[0]]
            positions += [start, start + 1]
            slots += self.block_manager.slots(seq, start, 2)
            if not seq.params.greedy:
                uniforms = []
                for _ in range(steps):
                    uniforms += torch.rand(4, generator=seq.generator).tolist() + host_uniforms([seq.generator])
                sampled[b] = (host_row(seq.params, vocab), uniforms, seq.draft_probs[0])
        return StepInputs(ids, positions, slots, slices), sampled

    @staticmethod
    def _verify_masks(seq, bitmask: torch.Tensor, row: int, token_masks: dict[int, torch.Tensor], known=None):
        """A constrained sequence's verify rows masked as `process_chain` masks them, into `bitmask` and
        `token_masks` ({row: its bitmask row}): the pending token's row by its constraint, and, when that allows the
        draft, the next row by the state after it (not where a call's name starts after the draft: the step stops
        at the draft then). `known`: the first row's mask from the last step (see `_next_masks`), used when the
        constraint stands where it was made. Returns the state after the draft (a fork), None where the draft is
        refused."""
        if known is not None and known[0] == seq.constraint.num_tokens:
            restriction = known[1]
            bitmask[row] = known[2]
        else:
            restriction = mask_for(seq.constraint, bitmask, row)
        if restriction is not None:
            token_masks[row] = bitmask[row]
        draft = seq.draft_token_ids[0]
        if not allows(restriction, bitmask, row, draft):
            return None
        after = follow(seq.constraint, seq, draft)
        if after.name_choices() is None and mask_for(after, bitmask, row + 1) is not None:
            token_masks[row + 1] = bitmask[row + 1]
        return after

    @staticmethod
    def _constrained_draft(seq, state, scratch: torch.Tensor, logits: torch.Tensor, uniform: float | None,
                           truncated: bool, draft: int, probs: torch.Tensor | None):
        """The next draft of a constrained sequence whose constraint stands at `state` after the step's tokens, as
        `propose_drafts` would make it: the step's own where `state` leaves the next token free (and the step's
        draft is of that row), else one chosen again from the row's draft `logits` masked by `state`, with the same
        uniform. `scratch`: a bitmask row this may overwrite. Returns the draft, its distribution (sampled) and the
        restriction (None: the next token is free)."""
        bitmask = scratch[None]
        restriction = mask_for(state, bitmask, 0)
        # A sampled draft was drawn only at the row after every emitted token; a truncation moves the row back.
        if restriction is None and not (truncated and uniform is not None):
            return draft, probs, restriction
        row = logits.clone()[None]
        if restriction is not None:
            masks.apply(row, bitmask)
        drafts, q = choose_drafts(row, [seq], None if uniform is None else [uniform])
        return drafts[0], None if q[0] is None else q[0][None], restriction
