"""Continuous batching: which sequences run in the next step and how many of their tokens (`schedule`), and
what a step did to them (`update`).

Each step has a token budget (`max_num_batched_tokens`) and a sequence limit (`max_num_seqs`). Running
sequences come first, in arrival order: a decoding sequence needs 1 token (plus its drafts), a sequence
still prefilling takes the next chunk of its prompt that fits the budget (chunked prefill). Waiting
sequences are admitted after them, first looking their prompt up in the prefix cache.

A sequence whose constraint stands where a call's name starts (`SequenceConstraint.name_choices`) takes, in its
decode step, room for the longest declared name on top of its pending token: the executor scores every name there
and computes the chosen one. A prefill that would end at such a point stops one token short, so that the choice is
made in a decode step.

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
    # Where a constrained call's name starts: the declared names the step chooses among (`name_choice.py`), each as
    # its tokens; the step scores each name after the pending token, then computes the chosen one as known tokens.
    name_choices: list[list[int]] | None = None


@dataclass
class SeqResult:
    """What one step did for one sequence."""

    token_ids: list[int]                              # new tokens (none for a prefill chunk before the end)
    logprobs: list[dict[int, float] | None] = field(default_factory=list)  # per new token, when asked for
    num_computed_tokens: int = 0                      # tokens whose K/V is valid after the step
    num_drafts: int = 0                               # draft tokens verified in the step
    prompt_logprobs: list[dict[int, float]] = field(default_factory=list)  # of the prompt tokens the chunk predicts
    num_accepted: int | None = None  # drafts accepted, where a run of steps verified several (else from the tokens)


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
            choices = self._name_choices(seq)
            num_tokens = min(remaining - (choices is not None), budget) if remaining > 1 else 1
            extra = max(map(len, choices)) if choices is not None and remaining == 1 else 0
            cost = num_tokens
            if remaining == 1:
                cost += extra if choices is not None else len(seq.draft_token_ids)
            if cost > budget:
                continue
            needed = seq.num_computed_tokens + num_tokens + extra + self.lookahead
            while not self.block_manager.can_allocate(seq, needed):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                continue
            self.block_manager.allocate(seq, needed)
            batch.append(ScheduledSeq(seq, num_tokens, choices if extra else None))
            budget -= cost

        while budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self._next_waiting()
            if seq is None:
                break
            if not seq.block_table:
                self.block_manager.match_prefix(seq)
            remaining = len(seq) - seq.num_computed_tokens
            choices = self._name_choices(seq)
            if choices is not None and remaining == 1:  # all but the pending token was in the prefix cache
                num_tokens, extra = 1, max(map(len, choices))
            else:
                num_tokens, extra = min(remaining - (choices is not None), budget), 0
            needed = seq.num_computed_tokens + num_tokens + extra + self.lookahead
            if num_tokens + extra > budget or not self.block_manager.can_allocate(seq, needed):
                self.block_manager.free(seq)  # give shared prefix blocks back until it can run
                seq.num_computed_tokens = seq.num_cached_tokens = 0
                break
            self.block_manager.allocate(seq, needed)
            self.waiting.remove(seq)  # the front, unless paused ones stand before it
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.append(ScheduledSeq(seq, num_tokens, choices if extra else None))
            budget -= num_tokens + extra
        return batch

    def _name_choices(self, seq: Sequence) -> list[list[int]] | None:
        """The declared names to choose among at the sequence's next token (`SequenceConstraint.name_choices`),
        when the longest fits in the context and in a step's token budget."""
        choices = seq.constraint.name_choices() if seq.constraint is not None else None
        longest = max(map(len, choices)) if choices is not None else 0
        if choices is None or len(seq) + longest >= self.max_model_len or 1 + longest > self.max_num_batched_tokens:
            return None
        return choices

    def update(self, batch: list[ScheduledSeq], result: StepResult) -> list[Sequence]:
        """Apply a step's result to its sequences; returns them. The caller frees the finished ones (`finish`) once
        the step is done with them (MTP drafting writes their K/V for the prefix cache first)."""
        for item in batch:
            seq, done = item.seq, result.seqs[item.seq.seq_id]
            seq.draft_token_ids, seq.draft_probs = [], None
            if done.prompt_logprobs:
                seq.prompt_logprobs.extend(done.prompt_logprobs)
            if done.num_drafts:
                seq.num_draft_tokens += done.num_drafts
                seq.num_accepted_tokens += done.num_accepted if done.num_accepted is not None else \
                    min(done.num_drafts, len(done.token_ids) - 1)
            logprobs = done.logprobs or [None] * len(done.token_ids)
            for token, token_logprobs in zip(done.token_ids, logprobs, strict=True):
                seq.append_token(token, self.max_model_len, token_logprobs)
                if seq.is_finished:
                    break
            # K/V past the tokens a stop left is not the sequence's (a run of decode steps went on past it)
            seq.num_computed_tokens = min(done.num_computed_tokens, len(seq))
            self.block_manager.register_computed_blocks(seq)
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
