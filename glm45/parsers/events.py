"""What the streaming parsers emit, and the small text-scanning helpers they share.

The parsers turn engine text deltas into three kinds of events, ordered as in the model's output:
`ReasoningDelta` (→ `delta.reasoning_content`), `ContentDelta` (→ `delta.content`) and `ToolCallDelta`
(→ one entry of `delta.tool_calls`, already in the OpenAI shape: index, then id and name once, then
fragments of the arguments JSON string).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class ReasoningDelta:
    text: str


@dataclass
class ContentDelta:
    text: str


@dataclass
class ToolCallDelta:
    """A piece of tool call number `index`: the first piece has `id` and `name`, later ones only
    `arguments` fragments. Joined, a call's fragments are one JSON object."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None

    def to_openai(self) -> dict[str, Any]:
        """The `delta.tool_calls[i]` entry of an OpenAI chat.completion.chunk."""
        out: dict[str, Any] = {"index": self.index}
        function: dict[str, Any] = {"arguments": self.arguments}
        if self.id is not None:
            out["id"] = self.id
            out["type"] = "function"
        if self.name is not None:
            function["name"] = self.name
        out["function"] = function
        return out


Event = ReasoningDelta | ContentDelta | ToolCallDelta


def append_event(events: list[Event], event: Event) -> None:
    """Append `event`, merging it into the previous one when they continue the same text or call."""
    if isinstance(event, (ReasoningDelta, ContentDelta)):
        if not event.text:
            return
        if events and type(events[-1]) is type(event):
            events[-1] = type(event)(events[-1].text + event.text)
            return
    elif event.name is None and event.id is None:
        if not event.arguments:
            return
        last = events[-1] if events else None
        if isinstance(last, ToolCallDelta) and last.index == event.index:
            events[-1] = ToolCallDelta(last.index, last.arguments + event.arguments, last.id, last.name)
            return
    events.append(event)


def find_first(text: str, tags: Sequence[str]) -> tuple[int, str | None]:
    """Position and text of the earliest of `tags` in `text`, or (-1, None)."""
    best, best_tag = -1, None
    for tag in tags:
        pos = text.find(tag)
        if pos >= 0 and (best < 0 or pos < best):
            best, best_tag = pos, tag
    return best, best_tag


def partial_tag_length(text: str, tags: Sequence[str]) -> int:
    """Length of the longest end of `text` that could be the start of one of `tags` (to hold back)."""
    longest = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), longest, -1):
            if text.endswith(tag[:n]):
                longest = n
                break
    return longest


def none_if_blank(text: str) -> str | None:
    return text if text.strip() else None


class LeadingBlankHold:
    """Holds a stream's text back until it contains a non-whitespace character.

    Whitespace-only output is reported as None by the one-shot parsers, so the streams must not emit it
    either. With `strip_newlines`, newlines at the very start are dropped (the template puts one after
    `<think>` and `</think>`).
    """

    def __init__(self, strip_newlines: bool):
        self.strip_newlines = strip_newlines
        self.started = False
        self._pending = ""

    def push(self, text: str) -> str:
        if self.started:
            return text
        self._pending += text
        if self.strip_newlines:
            self._pending = self._pending.lstrip("\n")
        if not self._pending.strip():
            return ""
        self.started = True
        out, self._pending = self._pending, ""
        return out
