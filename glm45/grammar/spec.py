"""What a request asks its output to obey, as plain data: `StructuredOutputsParams` (vLLM's name).

One request may constrain its answer (`json`: a JSON Schema, `json_object`: any JSON object, or vLLM's `regex`,
`choice`, `grammar`) and/or its tool calls (`tool_calls`): the declared `tools`, how strictly (`ToolCallMode`),
and whether more than one call may follow. `reasoning` says whether the model may think first
(`\\n<think>…</think>`, free text) before the constraint starts; None leaves it to the engine, which reads it
from the prompt (a GLM-4.5 prompt whose generation prompt ends with `<|assistant|>` lets the model think; one
that ends with the closed `</think>` of thinking-off, or with a prefilled call, does not).

The grammars themselves are built and compiled by `glm45.grammar.backend`; this module only holds and checks the
request's side, so that `SamplingParams` can carry it without importing a grammar engine.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class ToolCallMode(enum.Enum):
    """How GLM-4.5 tool calls (`<tool_call>NAME\\n<arg_key>K</arg_key>\\n<arg_value>V</arg_value>…</tool_call>`) are
    constrained.

    - REQUIRED: the answer is one or more calls (the prompt was prefilled with `<tool_call>`), each to a declared
      tool with arguments typed by its schema;
    - NAMED: the answer is one call to `tool_name`, typed (the prompt was prefilled with `<tool_call>NAME\\n`);
    - AUTO_NAME: free text, but once the model opens `<tool_call>` the name must be a declared one (the arguments
      are free up to `</tool_call>`);
    - AUTO_FULL: as AUTO_NAME, and the arguments are typed by the tool's schema too.
    """

    REQUIRED = "required"
    NAMED = "named"
    AUTO_NAME = "name"
    AUTO_FULL = "full"


@dataclass(frozen=True)
class ToolCallConstraint:
    tools: tuple[Mapping[str, Any], ...]   # OpenAI tool definitions ({"type": "function", "function": {...}})
    mode: ToolCallMode
    tool_name: str | None = None           # NAMED: the one tool
    parallel: bool = True                  # REQUIRED/AUTO: more than one call may follow

    def __post_init__(self) -> None:
        if not self.tools:
            raise ValueError("a tool-call constraint needs at least one tool")
        names = [tool_name(t) for t in self.tools]
        if self.mode == ToolCallMode.NAMED and self.tool_name not in names:
            raise ValueError(f"tool_name {self.tool_name!r} is not among the tools ({', '.join(names)})")

    @property
    def triggered(self) -> bool:
        """The call grammar applies only once the model opens `<tool_call>` by itself (tool_choice "auto")."""
        return self.mode in (ToolCallMode.AUTO_NAME, ToolCallMode.AUTO_FULL)


ANSWER_FORMATS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """vLLM's fields: at most one of `json` (a JSON Schema), `json_object`, `regex`, `choice` (one of these strings)
    and `grammar` (xgrammar's EBNF) for the answer; glm45's own `tool_calls` and `reasoning`."""

    json: Mapping[str, Any] | bool | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    tool_calls: ToolCallConstraint | None = None
    reasoning: bool | None = None  # the model may think first; None: read it from the prompt

    def __post_init__(self) -> None:
        given = [name for name in ANSWER_FORMATS if getattr(self, name) not in (None, False)]
        if len(given) > 1:
            raise ValueError(f"structured outputs take one answer format, got {', '.join(given)}")
        if self.json is not None and not isinstance(self.json, (Mapping, bool)):
            raise ValueError(f"json must be a JSON Schema (an object or a boolean), got {type(self.json).__name__}")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) for c in self.choice)):
            raise ValueError("choice must be a non-empty list of strings")
        for name in ("regex", "grammar"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string")
        if self.tool_calls is not None and not self.tool_calls.triggered and self.has_answer_format:
            raise ValueError("a forced tool call (tool_choice required or named) cannot also be a structured answer")

    @property
    def has_answer_format(self) -> bool:
        return any(getattr(self, name) not in (None, False) for name in ANSWER_FORMATS)


def tool_name(tool: Mapping[str, Any]) -> str:
    return (tool.get("function") or tool)["name"]


def tool_parameters(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    parameters = (tool.get("function") or tool).get("parameters")
    return parameters if parameters is not None else {"type": "object", "properties": {}}


def tool_call_constraint(tools: Sequence[Mapping[str, Any]] | None, tool_choice: Any, parallel: bool,
                         auto_mode: str) -> ToolCallConstraint | None:
    """The constraint a chat request's `tool_choice` asks for: "required", a named function, or "auto" with the
    server's `--tool-call-constraint` (`auto_mode`: off | name | full); None when nothing is constrained."""
    if not tools or tool_choice in (None, "none"):
        return None
    if isinstance(tool_choice, Mapping):
        name = (tool_choice.get("function") or {}).get("name")
        return ToolCallConstraint(tuple(tools), ToolCallMode.NAMED, tool_name=name, parallel=False)
    if tool_choice == "required":
        return ToolCallConstraint(tuple(tools), ToolCallMode.REQUIRED, parallel=parallel)
    if auto_mode == "off":
        return None
    mode = ToolCallMode.AUTO_FULL if auto_mode == "full" else ToolCallMode.AUTO_NAME
    return ToolCallConstraint(tuple(tools), mode, parallel=parallel)
