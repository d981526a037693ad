"""Continuous batching: which sequences run in the next step and how many of their tokens (`schedule`), and
what a step did to them (`update`).

Each step has a token budget (`max_num_batched_tokens`) and a sequence limit (`max_num_seqs`). Running
sequences come first, in arrival order: a decoding sequence needs 1 token (plus its drafts), a sequence
still prefilling takes the next chunk of its prompt that fits the budget (chunked prefill). Waiting
sequences are admitted after them, first looking their prompt up in the prefix cache.

A paused sequence (its request's reader is behind: `LLMEngine.pause_request`) is skipped until resumed; it
keeps its blocks.

When the KV cache has no block left for a running sequence, the most recently admitted running sequence
is preempted by recompute: its blocks are freed, its computed-token count reset, and it returns to the
front of the queue with all its tokens, to be prefilled again later. No request is lost or crashes.

After the model has run, `update` applies the step's `StepResult`: the sequences' new tokens (finishing those
that hit a stop token, `max_tokens` or the context length), the log-probabilities of the prompt tokens a chunk
covered (when asked for), how far their K/V is now valid, the prefix-cache hashes of blocks that became full,
and the blocks of finished sequences.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import torch

from glm45.engine.block_manager import BlockManager
from glm45.engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # known tokens to compute this step (drafts come on top)


@dataclass
class SeqResult:
    """What one step did for one sequence."""

    token_ids: list[int]                              # new tokens (none for a prefill chunk before the end)
    logprobs: list[dict[int, float] | None] = field(default_factory=list)  # per new token, when asked for
    num_computed_tokens: int = 0                      # tokens whose K/V is valid after the step
    num_drafts: int = 0                               # draft tokens verified in the step
    prompt_logprobs: list[dict[int, float]] = field(default_factory=list)  # of the prompt tokens the chunk predicts


@dataclass
class StepResult:
    seqs: dict[int, SeqResult]  # by seq_id, for every scheduled sequence


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, num_speculative_tokens: int = 0):
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.num_speculative_tokens = num_speculative_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.paused: set[int] = set()  # seq_ids not to schedule for now
        self.num_preemptions = 0

    @property
    def lookahead(self) -> int:
        """Extra slots a step may write past the known tokens: k verified drafts, then k-1 MTP drafts."""
        return 2 * self.num_speculative_tokens

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def pause(self, seq: Sequence) -> None:
        if not seq.is_finished:
            self.paused.add(seq.seq_id)

    def resume(self, seq: Sequence) -> None:
        self.paused.discard(seq.seq_id)

    def has_runnable(self) -> bool:
        if not self.paused:
            return bool(self.running or self.waiting)
        return any(seq.seq_id not in self.paused for queue in (self.running, self.waiting) for seq in queue)

    def _next_waiting(self) -> Sequence | None:
        if not self.paused:
            return self.waiting[0] if self.waiting else None
        return next((seq for seq in self.waiting if seq.seq_id not in self.paused), None)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.draft_token_ids, seq.draft_probs = [], None
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        logger.debug("preempted request %s (%d tokens) to free KV blocks", seq.request_id, len(seq))

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_num_batched_tokens
        batch: list[ScheduledSeq] = []
        preempted = False
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq not in self.running or seq.seq_id in self.paused:  # preempted earlier in this loop, or paused
                continue
            remaining = len(seq) - seq.num_computed_tokens
            num_tokens = min(remaining, budget) if remaining > 1 else 1
            cost = num_tokens + (len(seq.draft_token_ids) if remaining == 1 else 0)
            if cost > budget:
                continue
            needed = seq.num_computed_tokens + num_tokens + self.lookahead
            while not self.block_manager.can_allocate(seq, needed):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                continue
            self.block_manager.allocate(seq, needed)
            batch.append(ScheduledSeq(seq, num_tokens))
            budget -= cost

        while budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self._next_waiting()
            if seq is None:
                break
            if not seq.block_table:
                self.block_manager.match_prefix(seq)
            num_tokens = min(len(seq) - seq.num_computed_tokens, budget)
            needed = seq.num_computed_tokens + num_tokens + self.lookahead
            if not self.block_manager.can_allocate(seq, needed):
                self.block_manager.free(seq)  # give shared prefix blocks back until it can run
                seq.num_computed_tokens = seq.num_cached_tokens = 0
                break
            self.block_manager.allocate(seq, needed)
            self.waiting.remove(seq)  # the front, unless paused ones stand before it
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.append(ScheduledSeq(seq, num_tokens))
            budget -= num_tokens
        return batch

    def update(self, batch: list[ScheduledSeq], result: StepResult) -> list[Sequence]:
        """Apply a step's result to its sequences; returns them (finished ones are already freed)."""
        for item in batch:
            seq, done = item.seq, result.seqs[item.seq.seq_id]
            seq.num_computed_tokens = done.num_computed_tokens
            seq.draft_token_ids, seq.draft_probs = [], None
            if done.prompt_logprobs:
                seq.prompt_logprobs.extend(done.prompt_logprobs)
            if done.num_drafts:
                seq.num_draft_tokens += done.num_drafts
                seq.num_accepted_tokens += min(done.num_drafts, len(done.token_ids) - 1)
            logprobs = done.logprobs or [None] * len(done.token_ids)
            for token, token_logprobs in zip(done.token_ids, logprobs, strict=True):
                seq.append_token(token, self.max_model_len, token_logprobs)
                if seq.is_finished:
                    break
            self.block_manager.register_computed_blocks(seq)
            if seq.is_finished:
                self.finish(seq)
        return [item.seq for item in batch]

    def set_drafts(self, drafts: list[tuple[Sequence, list[int], torch.Tensor | None]]) -> None:
        """The MTP drafts each decoding sequence will have verified in its next step."""
        for seq, tokens, probs in drafts:
            if not seq.is_finished:
                seq.draft_token_ids, seq.draft_probs = tokens, probs

    def finish(self, seq: Sequence) -> None:
        """Remove a finished (or aborted) sequence and return its blocks at once."""
        self.paused.discard(seq.seq_id)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
