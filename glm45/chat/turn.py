"""Assembling an assistant turn from the model's output: parser events → reasoning, content and tool calls.

`AssistantTurn` wraps the streaming parser (`glm45.parsers.ChatOutputParser`) for one answer: `feed` the
generated text as it comes and get the events to stream; at the end, `message()` is the OpenAI-style assistant
message. Streaming and non-streaming front ends both go through it (`assemble_turn` for a whole text), so a
streamed answer and a non-streamed one are the same by construction.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from glm45.chat.plan import ChatPlan
from glm45.parsers import ChatOutputParser, ContentDelta, Event, ReasoningDelta, ToolCallDelta


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as OpenAI sends it

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    def parsed_arguments(self) -> dict[str, Any]:
        return json.loads(self.arguments or "{}")


class AssistantTurn:
    """One answer being parsed: reasoning, content and tool calls accumulated from the parser's events."""

    def __init__(self, tools: Sequence[Mapping[str, Any]] | None = None, *, reasoning: bool = True,
                 single_call: bool = False, prefix: str = ""):
        self._parser = ChatOutputParser(tools, reasoning=reasoning)
        self.single_call = single_call
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self._calls: dict[int, ToolCall] = {}
        self.prefix_events = self.feed(prefix) if prefix else []

    @classmethod
    def for_plan(cls, plan: ChatPlan) -> AssistantTurn:
        """The turn of a planned chat; the text the answer was prefilled with is parsed first."""
        return cls(plan.tools, reasoning=plan.reasoning, single_call=plan.single_call, prefix=plan.forced_prefix)

    def feed(self, text: str) -> list[Event]:
        return self._take(self._parser.feed(text))

    def finish(self) -> list[Event]:
        return self._take(self._parser.finish())

    def _take(self, events: list[Event]) -> list[Event]:
        if self.single_call:
            events = [e for e in events if not (isinstance(e, ToolCallDelta) and e.index > 0)]
        for event in events:
            if isinstance(event, ReasoningDelta):
                self._reasoning.append(event.text)
            elif isinstance(event, ContentDelta):
                self._content.append(event.text)
            elif event.index in self._calls:
                self._calls[event.index].arguments += event.arguments
            else:
                self._calls[event.index] = ToolCall(event.id, event.name, event.arguments)
        return events

    @property
    def reasoning(self) -> str | None:
        return "".join(self._reasoning) or None

    @property
    def content(self) -> str | None:
        return "".join(self._content) or None

    @property
    def tool_calls(self) -> list[ToolCall]:
        return [self._calls[i] for i in sorted(self._calls)]

    def message(self) -> dict[str, Any]:
        """The OpenAI assistant message (`content` is "" rather than None when there is nothing else)."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning is not None:
            message["reasoning_content"] = self.reasoning
        if self._calls:
            message["tool_calls"] = [call.to_openai() for call in self.tool_calls]
        elif message["content"] is None:
            message["content"] = ""
        return message


def assemble_turn(text: str, plan: ChatPlan) -> AssistantTurn:
    """The parsed turn of a whole generated answer to a planned chat."""
    turn = AssistantTurn.for_plan(plan)
    turn.feed(text)
    turn.finish()
    return turn
