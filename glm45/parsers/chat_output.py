"""Reasoning, content and tool calls of one generated assistant turn, as the server and `LLM.chat` need them.

Reasoning is split off first and tool calls are looked for only in the content after it. A thought ends at
`</think>`, or at a `<tool_call>` written before it (the model calling a tool without closing its thought;
see `glm45.parsers.reasoning`), so that call is parsed as a call. `ChatOutputParser` streams;
`parse_chat_output` is the one-shot equivalent, and for any chunking of a turn the two agree (see the two
parsers' docstrings).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from glm45.parsers.events import ContentDelta, Event, append_event
from glm45.parsers.reasoning import ReasoningParser, parse_reasoning
from glm45.parsers.tool_calls import ToolCallParser, _new_call_id, parse_tool_calls


@dataclass
class ChatOutput:
    """A parsed assistant turn: `tool_calls` entries are `{"name": str, "arguments": dict}`."""

    reasoning: str | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


def parse_chat_output(
    text: str, tools: Sequence[Mapping[str, Any]] | None = None, *, reasoning: bool = True
) -> ChatOutput:
    """Parse a complete generated turn. Tool calls are parsed only when `tools` are given; reasoning
    only when `reasoning` (the server's `--reasoning-parser`)."""
    thought, content = parse_reasoning(text) if reasoning else (None, text if text.strip() else None)
    if tools is None:
        return ChatOutput(thought, content)
    content, calls = parse_tool_calls(content or "", tools)
    return ChatOutput(thought, content, calls)


class ChatOutputParser:
    """Streaming `parse_chat_output`: feed the engine's text deltas, get Reasoning/Content/ToolCall deltas."""

    def __init__(
        self,
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        reasoning: bool = True,
        new_call_id: Callable[[], str] = _new_call_id,
    ):
        self._reasoning = ReasoningParser() if reasoning else None
        self._tools = ToolCallParser(tools, new_call_id) if tools is not None else None
        self._blank_content = ""  # without reasoning or tool parsing, whitespace-only content is held here

    @property
    def unterminated_tool_call(self) -> bool:
        """The output ended inside a tool call whose name was already streamed."""
        return self._tools is not None and self._tools.unterminated

    def feed(self, text: str) -> list[Event]:
        first = self._reasoning.feed(text) if self._reasoning else [ContentDelta(text)]
        return self._route(first, final=False)

    def finish(self) -> list[Event]:
        first = self._reasoning.finish() if self._reasoning else []
        return self._route(first, final=True)

    def _route(self, events: list[Event], final: bool) -> list[Event]:
        out: list[Event] = []
        for event in events:
            if not isinstance(event, ContentDelta):
                append_event(out, event)
            elif self._tools is not None:
                for tool_event in self._tools.feed(event.text):
                    append_event(out, tool_event)
            elif self._reasoning is not None:
                append_event(out, event)
            else:
                self._emit_plain(out, event.text)
        if final and self._tools is not None:
            for tool_event in self._tools.finish():
                append_event(out, tool_event)
        return out

    def _emit_plain(self, out: list[Event], text: str) -> None:
        # Neither parser runs: content passes through, except that whitespace-only output stays None.
        if self._blank_content is not None:
            self._blank_content += text
            if not self._blank_content.strip():
                return
            text, self._blank_content = self._blank_content, None
        append_event(out, ContentDelta(text))
