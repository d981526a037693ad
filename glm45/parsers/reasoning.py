"""Split GLM-4.5 output into reasoning (`<think>…</think>`) and the answer, one-shot and streaming.

The parser looks only at what the model generated in this turn (the prompt's past turns are full of
`<think></think>`). The rules, identical in both modes:
- The output is reasoning only when it starts, after optional whitespace, with `<think>`. An output
  that skips thinking (or runs with thinking disabled, whose prompt already closed the thought) is all
  content; a `<think>` later in the text is literal content.
- `</think>` ends the reasoning; output cut off before it (max tokens) is all reasoning, no content.
- The newlines the template puts around the tags are not part of either: leading newlines of the
  reasoning and of the content, and trailing newlines of a closed reasoning, are dropped.
- Whitespace-only reasoning or content is None.
While streaming, text that might be the start of a tag (`<thi`, `</thin`) is held back until it is
known, so no partial tag ever reaches either stream.
"""

from __future__ import annotations

from glm45.parsers.events import (
    ContentDelta,
    Event,
    LeadingBlankHold,
    ReasoningDelta,
    append_event,
    none_if_blank,
    partial_tag_length,
)

THINK_START = "<think>"
THINK_END = "</think>"


def parse_reasoning(text: str) -> tuple[str | None, str | None]:
    """(reasoning, content) of a complete model output; each None when empty or whitespace-only."""
    head = text.lstrip()
    if not head.startswith(THINK_START):
        return None, none_if_blank(text.lstrip("\n"))
    after = head[len(THINK_START):]
    reasoning, closed, content = after.partition(THINK_END)
    if not closed:
        return none_if_blank(after.lstrip("\n")), None
    return none_if_blank(reasoning.lstrip("\n").rstrip("\n")), none_if_blank(content.lstrip("\n"))


class ReasoningParser:
    """Streaming `parse_reasoning`: `feed(delta)` and `finish()` return ReasoningDelta/ContentDelta events.

    Whatever the chunking, the joined reasoning and content equal `parse_reasoning(whole_text)` (an empty
    join standing for None).
    """

    def __init__(self) -> None:
        self._state = "start"  # start → reasoning → content, or start → content
        self._buf = ""  # text received but not yet emitted
        self._reasoning = LeadingBlankHold(strip_newlines=True)
        self._content = LeadingBlankHold(strip_newlines=True)

    def feed(self, text: str) -> list[Event]:
        self._buf += text
        events: list[Event] = []
        self._advance(events, final=False)
        return events

    def finish(self) -> list[Event]:
        """End of output: release what was held back (a cut-off thought is all reasoning)."""
        events: list[Event] = []
        self._advance(events, final=True)
        return events

    def _advance(self, events: list[Event], final: bool) -> None:
        if self._state == "start":
            head = self._buf.lstrip()
            if head.startswith(THINK_START):
                self._state, self._buf = "reasoning", head[len(THINK_START):]
            elif not final and THINK_START.startswith(head):
                return  # nothing yet, or a possible "<think>" still arriving
            else:
                self._state = "content"
        if self._state == "reasoning":
            end = self._buf.find(THINK_END)
            if end >= 0:
                self._emit_reasoning(events, self._buf[:end].rstrip("\n"))
                self._state, self._buf = "content", self._buf[end + len(THINK_END):]
            elif final:
                self._emit_reasoning(events, self._buf)
                self._buf = ""
                return
            else:
                safe = self._buf[:len(self._buf) - partial_tag_length(self._buf, (THINK_END,))]
                # Trailing newlines wait: they are dropped if "</think>" comes next.
                safe = safe.rstrip("\n")
                self._emit_reasoning(events, safe)
                self._buf = self._buf[len(safe):]
                return
        append_event(events, ContentDelta(self._content.push(self._buf)))
        self._buf = ""

    def _emit_reasoning(self, events: list[Event], text: str) -> None:
        append_event(events, ReasoningDelta(self._reasoning.push(text)))
