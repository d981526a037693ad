"""Rollouts for reinforcement learning: prompts from JSONL, completions drawn by glm45's own engine, parsed and scored.

A prompt row is a JSON object with OpenAI-style `messages` (or TRL's `prompt`: the same list) ending with a user or
tool message, optional `tools` and `enable_thinking` (default true); every other field is passed to the reward as a
keyword argument (an expected call, a task kind, a reference answer…).

The reward is a Python callable named `module:function` (or `path/to/file.py:function`), called once per
completion as

    reward(prompt, completion, **fields) -> float

with `prompt = {"messages", "tools", "enable_thinking"}` and `completion = {"text", "reasoning_content",
"content", "tool_calls": [{"name", "arguments"}], "finish_reason", "token_ids"}` — parsed exactly as the server
parses an answer (`glm45.chat.plan_chat` + `assemble_turn`; with no tools declared, nothing is parsed as a call and
any `<tool_call>` text stays in `text` and `content`).

`Rollouts.sample` submits every prompt with `n = G` to an `LLMEngine` that runs the policy's own modules in this
process (paged KV cache, continuous batching, MTP drafts when asked), steps it until all are done and returns the
completions in prompt order.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glm45.chat import assemble_turn, normalize_messages, plan_chat
from glm45.train.data import read_records

logger = logging.getLogger(__name__)

PROMPT_KEYS = ("messages", "prompt", "tools", "enable_thinking")


@dataclass
class PromptRow:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    enable_thinking: bool
    fields: dict[str, Any]

    @property
    def prompt(self) -> dict[str, Any]:
        return {"messages": self.messages, "tools": self.tools, "enable_thinking": self.enable_thinking}


def parse_prompt_row(record: Any) -> PromptRow:
    if not isinstance(record, dict):
        raise ValueError(f"a prompt row must be a JSON object, got {type(record).__name__}")
    messages = record.get("messages", record.get("prompt"))
    if not isinstance(messages, list) or not messages:
        raise ValueError("a prompt row needs a non-empty 'messages' (or 'prompt') list of messages")
    normalize_messages(messages)
    if messages[-1].get("role") not in ("user", "tool"):
        raise ValueError(f"a prompt must end with a user or tool message, not {messages[-1].get('role')!r}: the "
                         "assistant's turn is what is sampled")
    tools = record.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise ValueError(f"'tools' must be a list of tool definitions or null, got {type(tools).__name__}")
    thinking = record.get("enable_thinking", True)
    if not isinstance(thinking, bool):
        raise ValueError(f"'enable_thinking' must be true or false, got {thinking!r}")
    fields = {k: v for k, v in record.items() if k not in PROMPT_KEYS}
    return PromptRow(messages, tools or None, thinking, fields)


def load_prompts(path: str | Path) -> list[PromptRow]:
    return read_records(path, parse_prompt_row, "prompt row")


def load_reward(spec: str) -> Callable[..., float]:
    """`package.module:function` or `path/to/file.py:function` → the callable."""
    module_name, sep, function_name = spec.rpartition(":")
    if not sep or not module_name or not function_name:
        raise ValueError(f"--reward must be 'module:function' or 'file.py:function', got {spec!r}")
    if module_name.endswith(".py"):
        file = Path(module_name)
        if not file.is_file():
            raise FileNotFoundError(f"no reward file {file}")
        module_spec = importlib.util.spec_from_file_location(file.stem, file)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"cannot import the reward module {module_name!r}: {e}") from e
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"{module_name} has no callable {function_name!r}")
    return function


@dataclass
class Completion:
    """One sampled completion with its parse and reward."""

    row: int                    # index of its prompt in the batch
    prompt_ids: list[int]
    token_ids: list[int]
    parsed: dict[str, Any]
    reward: float = 0.0


@dataclass
class RolloutBatch:
    completions: list[Completion]
    seconds: float
    tokens: int
    stats: dict[str, float] = field(default_factory=dict)


class Rollouts:
    """Draws G completions per prompt with an engine over the policy's modules and scores them."""

    def __init__(self, engine, reward: Callable[..., float], group_size: int, temperature: float,
                 max_tokens: int, seed: int):
        self.engine, self.reward = engine, reward
        self.group_size, self.temperature, self.max_tokens, self.seed = group_size, temperature, max_tokens, seed

    def sample(self, rows: list[PromptRow], step: int, progress=None) -> RolloutBatch:
        from glm45.engine.sampling_params import SamplingParams

        plans = [plan_chat(r.messages, r.tools, template_kwargs={"enable_thinking": r.enable_thinking}) for r in rows]
        started = time.perf_counter()
        request_ids = []
        for i, plan in enumerate(plans):
            # A seed per (run, step, prompt): a resumed run draws the same completions as an uninterrupted one.
            params = SamplingParams(n=self.group_size, temperature=self.temperature, max_tokens=self.max_tokens,
                                    seed=(self.seed * 1_000_003 + step * 1009 + i) % (2**31))
            request_id = f"rl-{step}-{i}"
            self.engine.add_request(request_id, plan.prompt, params)
            request_ids.append(request_id)
        finished = {}
        while len(finished) < len(request_ids):
            for output in self.engine.step():
                if output.finished:
                    finished[output.request_id] = output
                    if progress is not None:
                        progress.update(self.group_size)
        seconds = time.perf_counter() - started
        completions = []
        for i, (row, plan, request_id) in enumerate(zip(rows, plans, request_ids, strict=True)):
            output = finished[request_id]
            for sample in output.outputs:
                parsed = parse_completion(sample.text, plan, sample.finish_reason, sample.token_ids)
                completion = Completion(i, list(output.prompt_token_ids), list(sample.token_ids), parsed)
                completion.reward = float(self.reward(row.prompt, parsed, **row.fields))
                completions.append(completion)
        tokens = sum(len(c.token_ids) for c in completions)
        return RolloutBatch(completions, seconds, tokens)


def parse_completion(text: str, plan, finish_reason: str | None, token_ids: list[int]) -> dict[str, Any]:
    turn = assemble_turn(text, plan)
    calls = []
    for call in turn.tool_calls:
        try:
            arguments = call.parsed_arguments()
        except json.JSONDecodeError:
            arguments = call.arguments
        calls.append({"name": call.name, "arguments": arguments})
    return {"text": text, "reasoning_content": turn.reasoning, "content": turn.content, "tool_calls": calls,
            "finish_reason": finish_reason, "token_ids": list(token_ids)}
