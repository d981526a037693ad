"""Runs of decode steps: how many steps a batch's next call of the runner takes (`RunPlanner`), and what ends each
sequence inside a run.

On CPUs the captured step can run several decode steps in one call (`ModelRunner.decode_steps`, and MTP's one-program
steps, `draft_step_run`), so that the engine's Python between steps, slow once a step has streamed the weights through
the caches, is paid once a run. A batch runs so when every sequence decodes plainly (`decodes_plainly`). A run lasts
at most about `RUN_SECONDS`, judged by the last decode step's time, so a stream's tokens never come in long bursts:
where a step costs much more than that Python (a large model), runs are not worth their burstiness. A sequence's first
token is never part of a run (the time to it stays a step's)."""

from __future__ import annotations

from glm45.engine.block_manager import BlockManager
from glm45.engine.scheduler import ScheduledSeq
from glm45.engine.sequence import Sequence

RUN_SECONDS = 0.05  # the longest run of decode steps in one call, judged by the last decode step's time


def decodes_plainly(item: ScheduledSeq) -> bool:
    """Whether the sequence computes its one pending token and asks nothing of the logits but a token: no chosen
    name, penalty, logit bias, log-probabilities or adapter (drafts and constraints are the caller's to judge)."""
    seq, params = item.seq, item.seq.params
    return (item.num_tokens == 1 and seq.num_computed_tokens + 1 == len(seq) and item.name_choices is None
            and not params.uses_penalties and not params.logit_bias and params.logprobs is None
            and params.prompt_logprobs is None and seq.lora_slot < 0)


class RunPlanner:
    """Chooses each call's run length from the runner's limits, the sequences and the last decode step's time, and
    allocates the run's blocks."""

    def __init__(self, runner, block_manager: BlockManager, max_model_len: int | None):
        self.runner, self.block_manager, self.max_model_len = runner, block_manager, max_model_len
        self.step_seconds: float | None = None  # the last decode step's time (a run's, per step)

    def record(self, batch: list[ScheduledSeq], seconds: float, steps: int) -> None:
        """A call that took `seconds` for `steps` steps; decode calls (one known token a sequence) set the pace."""
        if all(item.num_tokens == 1 for item in batch):
            self.step_seconds = seconds / steps

    def decode_steps(self, batch: list[ScheduledSeq]) -> int:
        """How many plain decode steps (no MTP) the batch runs in one call (1: a step of its own)."""
        if not hasattr(self.runner, "max_decode_steps") or not all(
                decodes_plainly(item) and item.seq.num_output_tokens and not item.seq.draft_token_ids
                and item.seq.constraint is None for item in batch):
            return 1
        return self._length(batch, self.runner.max_decode_steps(len(batch)), 1)

    def draft_steps(self, batch: list[ScheduledSeq]) -> int:
        """How many one-program MTP steps (`DraftSteps.applies` holds) the batch runs in one call: several when
        the runner runs them and no sequence is constrained (its masks are made on the host between steps)."""
        if not hasattr(self.runner, "max_decode_steps") or any(item.seq.constraint is not None for item in batch):
            return 1
        return self._length(batch, self.runner.max_decode_steps(2 * len(batch), draft=True), 2)

    def _length(self, batch: list[ScheduledSeq], limit: int, advance: int) -> int:
        """A run's steps: as many as the longest useful run (`max_tokens`, the context; a step takes at least one
        token), within `limit` and with every position a step writes (a sequence moves on by at most `advance` a step)
        inside every context; 1 unless each sequence's blocks for the run can be allocated, as they are here."""
        if self.step_seconds is None or self.max_model_len is None:
            return 1
        limit = min(limit, int(RUN_SECONDS / max(self.step_seconds, 1e-6)))
        if limit <= 1:
            return 1
        useful = 1
        for item in batch:
            useful = max(useful, self.until(item.seq)[1])
            limit = min(limit, (self.max_model_len - item.seq.num_computed_tokens) // advance)
        steps = min(limit, useful)
        bm = self.block_manager
        needed = [(item.seq, item.seq.num_computed_tokens + advance * steps) for item in batch]
        if steps <= 1 or sum(max(0, bm.blocks_needed(n) - len(seq.block_table)) for seq, n in needed) \
                > bm.num_free_blocks:
            return 1
        for seq, n in needed:
            bm.allocate(seq, n)
        return steps

    def until(self, seq: Sequence) -> tuple[list[int], int]:
        """What ends a sequence inside a run: its stop ids, and how many tokens it may still take."""
        left = self.max_model_len - len(seq)
        if seq.params.max_tokens is not None:
            left = min(left, seq.params.max_tokens - seq.num_output_tokens)
        return sorted(seq.stop_ids), left
