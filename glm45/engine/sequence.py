"""The state of one request in the engine (`Sequence`) and what the engine hands back (`RequestOutput`).

A sequence's tokens are its prompt followed by what it generated. `num_computed_tokens` of them have
their K/V in the cache; the scheduler moves that counter forward chunk by chunk, and preemption resets it
to zero (the KV is recomputed later from the tokens, which are kept). Text, stop strings and the
finish reason live here too, so that the engine's step only has to append sampled tokens.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from glm45.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None                      # "stop" | "length" | "abort" | None while running
    logprobs: list[dict[int, float]] | None = None  # per generated token: {token id: logprob}
    stop_reason: int | str | None = None           # the stop string or token id that ended it


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: dict = field(default_factory=dict)  # with MTP: spec_draft_tokens, spec_accepted_tokens (all n)


class Sequence:
    _counter = itertools.count()

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: list[int],
        detokenizer=None,
        generator: torch.Generator | None = None,
        index: int = 0,
    ):
        self.seq_id = next(Sequence._counter)
        self.request_id = request_id
        self.index = index  # which of the request's n completions this is
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at admission
        self.block_table: list[int] = []
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        self.detokenizer = detokenizer
        self.generator = generator
        self.text = ""
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        # Speculative decoding: draft tokens proposed by the MTP layer for the next step, with the draft
        # distributions they were sampled from (None for greedy requests).
        self.draft_token_ids: list[int] = []
        self.draft_probs: torch.Tensor | None = None
        self.num_draft_tokens = 0     # drafts this sequence had verified
        self.num_accepted_tokens = 0  # of them, accepted
        self.first_token_time: float | None = None
        self.arrival_time: float = 0.0

    # ------------------------------------------------------------------ sizes
    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def in_prefill(self) -> bool:
        """True while some of its known tokens (prompt, or generated ones after preemption) lack K/V."""
        return self.num_computed_tokens < len(self.token_ids) - 1

    # ------------------------------------------------------------------ appending output
    def append_token(self, token_id: int, max_model_len: int, logprobs: dict[int, float] | None = None) -> None:
        """Add one sampled token and decide whether the sequence is finished."""
        self.token_ids.append(token_id)
        if self.logprobs is not None and logprobs is not None:
            self.logprobs.append(logprobs)
        if token_id in self.stop_ids:
            self.finish("stop", token_id)
            return
        if self.detokenizer is not None:
            delta = self.detokenizer.feed(token_id)
            self.text += delta
            if self.params.stop and delta and self._check_stop_strings(len(delta)):
                return
        max_tokens = self.params.max_tokens
        if (max_tokens is not None and self.num_output_tokens >= max_tokens) or len(self) >= max_model_len:
            self.finish("length")

    def _check_stop_strings(self, delta_len: int) -> bool:
        for stop in self.params.stop:
            # Only the new text can complete a match; search from far enough back for a stop string that
            # straddles the previous end of the text (tokens and stop strings need not align).
            position = self.text.find(stop, max(0, len(self.text) - delta_len - len(stop) + 1))
            if position != -1:
                end = position + len(stop) if self.params.include_stop_str_in_output else position
                self.text = self.text[:end]
                self.finish("stop", stop)
                return True
        return False

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        if self.status == SequenceStatus.FINISHED:
            return
        if self.detokenizer is not None and not isinstance(stop_reason, str):
            # Release bytes held back for an incomplete character; after a stop string the text is final.
            self.text += self.detokenizer.finish()
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason

    def stream_safe_text(self) -> str:
        """Text that can be shown now: while running, hold back a tail that could begin a stop string."""
        if self.is_finished or not self.params.stop:
            return self.text
        holdback = max(len(s) for s in self.params.stop) - 1
        return self.text[: max(0, len(self.text) - holdback)]

    def completion(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=self.stream_safe_text(),
            token_ids=list(self.output_token_ids),
            finish_reason=self.finish_reason,
            logprobs=None if self.logprobs is None else list(self.logprobs),
            stop_reason=self.stop_reason,
        )
