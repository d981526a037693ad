"""Per-request sampling parameters, in vLLM's names and meanings, validated on construction."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from glm45.grammar.spec import StructuredOutputsParams

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class RequestOutputKind(enum.Enum):
    """What each `RequestOutput` of a request carries: everything so far (the default), only what is new since the
    request's previous output (the server's streams), or (vLLM's FINAL_ONLY, what `LLM.generate` asks for) one
    output, everything, when the request finishes: no output is built for the steps before."""

    CUMULATIVE = "cumulative"
    DELTA = "delta"
    FINAL_ONLY = "final_only"


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0          # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1                   # -1 (or 0) means no limit
    min_p: float = 0.0
    max_tokens: int | None = 16       # None: up to the context length
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None       # number of top log-probabilities to return per token (0: only the chosen)
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (0: only the prompt's own)
    # glm45's own: prompt tokens before this position get no log-probabilities (None), so the prefix cache may
    # serve them — for evaluators that score only a suffix (an answer, an assistant turn) of a long prompt.
    prompt_logprobs_from: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # OpenAI's logit_bias: {token id: bias in [-100, 100]} added to the logits before sampling (log-probabilities
    # stay those of the model's own distribution); -100 in effect bans a token, 100 forces it.
    logit_bias: dict[int, float] | None = None
    # Constrained decoding (`glm45.grammar`): a JSON schema or object, GLM-4.5 tool calls.
    structured_outputs: StructuredOutputsParams | None = None
    # Tokens the model may think for (`<think>…`) before the engine closes the thought with `</think>`.
    thinking_budget: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0:
            self.top_k = -1
        self.validate()

    def validate(self) -> None:
        def fail(name: str, allowed: str) -> None:
            raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

        if not isinstance(self.n, int) or self.n < 1:
            fail("n", "an integer ≥ 1")
        if not 0.0 <= self.temperature <= 100.0:
            fail("temperature", "in [0, 100]")
        if not 0.0 < self.top_p <= 1.0:
            fail("top_p", "in (0, 1]")
        if not isinstance(self.top_k, int) or (self.top_k < 1 and self.top_k != -1):
            fail("top_k", "-1 (no limit) or an integer ≥ 1")
        if not 0.0 <= self.min_p <= 1.0:
            fail("min_p", "in [0, 1]")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            fail("max_tokens", "an integer ≥ 1 or None")
        if not -2.0 <= self.presence_penalty <= 2.0:
            fail("presence_penalty", "in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            fail("frequency_penalty", "in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 2.0:
            fail("repetition_penalty", "in (0, 2]")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            fail("logprobs", "an integer in [0, 20] or None")
        if self.prompt_logprobs is not None and (not isinstance(self.prompt_logprobs, int)
                                                 or not 0 <= self.prompt_logprobs <= 20):
            fail("prompt_logprobs", "an integer in [0, 20] or None")
        if not isinstance(self.prompt_logprobs_from, int) or self.prompt_logprobs_from < 1:
            fail("prompt_logprobs_from", "an integer ≥ 1")
        if self.seed is not None and (not isinstance(self.seed, int) or not INT64_MIN <= self.seed <= INT64_MAX):
            fail("seed", f"an integer in [{INT64_MIN}, {INT64_MAX}] (64-bit) or None")
        if any(not isinstance(s, str) or not s for s in self.stop):
            fail("stop", "a list of non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            fail("stop_token_ids", "a list of non-negative token ids")
        if self.logit_bias is not None and any(
                not isinstance(t, int) or isinstance(t, bool) or t < 0 or not isinstance(b, (int, float))
                or not -100.0 <= b <= 100.0 for t, b in self.logit_bias.items()):
            fail("logit_bias", "a map of non-negative token ids to biases in [-100, 100]")
        if self.thinking_budget is not None and (not isinstance(self.thinking_budget, int) or self.thinking_budget < 0
                                                 or (self.max_tokens is not None
                                                     and self.thinking_budget >= self.max_tokens)):
            fail("thinking_budget", "an integer ≥ 0 and less than max_tokens, or None")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
