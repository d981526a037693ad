"""The state of one request's completion in the engine (`Sequence`), and what the engine hands back
(`CompletionOutput`, `RequestOutput`).

A sequence under constrained decoding carries its `constraint` (`glm45.grammar`), advanced with every token.

A sequence's tokens are its prompt followed by what it generated. `num_computed_tokens` of them have their
K/V in the cache; the scheduler moves that counter forward chunk by chunk, and preemption resets it to zero
(the KV is recomputed later from the tokens, which are kept). The scheduler changes a sequence's tokens and
status (`Scheduler.update`); its text lives with the output processor (`output.py`).
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
    # With `prompt_logprobs`, once the whole prompt is computed (None before): per prompt token {token id: logprob}
    # (the token's own first, then the top k), None for the first token, which nothing predicts (as in vLLM).
    prompt_logprobs: list[dict[int, float] | None] | None = None


class Sequence:
    _counter = itertools.count()
    lora_slot = -1                  # the served LoRA adapter's slot (-1: the base model), see engine/lora.py
    cache_salt: bytes | None = None  # keys its prefix-cache blocks apart from other adapters'

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: list[int],
        generator: torch.Generator | None = None,
        index: int = 0,
        arrival_time: float = 0.0,
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
        self.generator = generator
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        # One entry per prompt token computed so far (None for the first, and for any before `prompt_logprobs_from`);
        # the request's first completion carries them, the others of n share its prompt.
        self.prompt_logprobs: list[dict[int, float] | None] | None = None
        if params.prompt_logprobs is not None and index == 0:
            self.prompt_logprobs = [None] * min(params.prompt_logprobs_from, self.num_prompt_tokens)
        # Speculative decoding: draft tokens proposed by the MTP layer for the next step, with the draft
        # distributions they were sampled from (None for greedy requests).
        self.draft_token_ids: list[int] = []
        self.draft_probs: torch.Tensor | None = None
        self.num_draft_tokens = 0     # drafts this sequence had verified
        self.num_accepted_tokens = 0  # of them, accepted
        self.arrival_time = arrival_time
        # Constrained decoding (`glm45.grammar.SequenceConstraint`), set by the engine when the request asks for it:
        # it sees every token appended and restricts the next one.
        self.constraint = None

    # ------------------------------------------------------------------ sizes
    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_prompt_logprobs_done(self) -> int:
        """Leading prompt tokens whose log-probabilities are known (all of them when none were asked for)."""
        return self.num_prompt_tokens if self.prompt_logprobs is None else len(self.prompt_logprobs)

    def prompt_logprob_positions(self, start: int, num_tokens: int) -> range:
        """Positions among [start, start + num_tokens) computed in a step whose logits give a prompt token's
        missing log-probability: position p predicts token p + 1, so p runs up to the prompt's second-last token.
        (Tokens recomputed after a preemption already have theirs.)"""
        return range(max(start, self.num_prompt_logprobs_done - 1), min(start + num_tokens, self.num_prompt_tokens - 1))

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def in_prefill(self) -> bool:
        """True while some of its known tokens (prompt, or generated ones after preemption) lack K/V."""
        return self.num_computed_tokens < len(self.token_ids) - 1

    # ------------------------------------------------------------------ appending output
    def append_token(self, token_id: int, max_model_len: int, logprobs: dict[int, float] | None = None) -> None:
        """Add one sampled token and finish the sequence on a stop token, `max_tokens` or the context length.
        (Stop strings need the text: the output processor checks them.)"""
        self.token_ids.append(token_id)
        if self.logprobs is not None and logprobs is not None:
            self.logprobs.append(logprobs)
        if self.constraint is not None:
            self.constraint.accept(token_id)
        if token_id in self.stop_ids or (self.constraint is not None and self.constraint.finished):
            self.finish("stop", token_id)  # a constrained answer that is complete ends at its stop token
            return
        max_tokens = self.params.max_tokens
        if (max_tokens is not None and self.num_output_tokens >= max_tokens) or len(self) >= max_model_len:
            self.finish("length")

    def finishes_within(self, tokens: list[int], max_model_len: int, start: int = 0) -> bool:
        """Whether appending `tokens` one by one (`append_token`) would finish the sequence (constraints and stop
        strings aside); `start`: the first `start` tokens are known not to."""
        max_tokens = self.params.max_tokens
        for i, token in enumerate(tokens[start:], start + 1):
            if token in self.stop_ids or (max_tokens is not None and self.num_output_tokens + i >= max_tokens) \
                    or len(self) + i >= max_model_len:
                return True
        return False

    def finish(self, reason: str, stop_reason: int | str | None = None, replace: bool = False) -> None:
        """The first finish stands, unless `replace` (the tokens that made it were taken back)."""
        if self.status == SequenceStatus.FINISHED and not replace:
            return
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
