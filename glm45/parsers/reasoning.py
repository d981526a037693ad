"""Split GLM-4.5 output into reasoning (`<think>…</think>`) and the answer, one-shot and streaming.

The parser looks only at what the model generated in this turn (the prompt's past turns are full of
`<think></think>`). The rules, identical in both modes:
- The output is reasoning only when it starts, after optional whitespace, with `<think>`. An output
  that skips thinking (or runs with thinking disabled, whose prompt already closed the thought) is all
  content; a `<think>` later in the text is literal content.
- `</think>` ends the reasoning; output cut off before it (max tokens) is all reasoning, no content.
- So does a `<tool_call>` before any `</think>`: the model sometimes starts calling a tool without closing
  its thought, and the call belongs to the answer (SGLang's GLM-4.5 parser does the same). The tag stays
  at the start of the content, for the tool-call parser; a `</think>` after it is then plain content.
- The newlines the template puts around the tags are not part of either: leading newlines of the
  reasoning and of the content, and trailing newlines of an ended reasoning, are dropped.
- Whitespace-only reasoning or content is None.
While streaming, text that might be the start of a tag (`<thi`, `</thin`, `<tool_ca`) is held back until
it is known, so no partial tag ever reaches either stream.
"""

from __future__ import annotations

from glm45.parsers.events import (
    ContentDelta,
    Event,
    LeadingBlankHold,
    ReasoningDelta,
    append_event,
    find_first,
    none_if_blank,
    partial_tag_length,
)

THINK_START = "<think>"
THINK_END = "</think>"
TOOL_CALL_START = "<tool_call>"
_REASONING_ENDS = (THINK_END, TOOL_CALL_START)  # what ends a thought; "<tool_call>" stays in the content


def parse_reasoning(text: str) -> tuple[str | None, str | None]:
    """(reasoning, content) of a complete model output; each None when empty or whitespace-only."""
    head = text.lstrip()
    if not head.startswith(THINK_START):
        return None, none_if_blank(text.lstrip("\n"))
    after = head[len(THINK_START):]
    end, tag = find_first(after, _REASONING_ENDS)
    if tag is None:
        return none_if_blank(after.lstrip("\n")), None
    content = after[end + len(THINK_END):] if tag == THINK_END else after[end:]
    return none_if_blank(after[:end].lstrip("\n").rstrip("\n")), none_if_blank(content.lstrip("\n"))


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
            end, tag = find_first(self._buf, _REASONING_ENDS)
            if tag is not None:
                self._emit_reasoning(events, self._buf[:end].rstrip("\n"))
                skip = len(THINK_END) if tag == THINK_END else 0
                self._state, self._buf = "content", self._buf[end + skip:]
            elif final:
                self._emit_reasoning(events, self._buf)
                self._buf = ""
                return
            else:
                safe = self._buf[:len(self._buf) - partial_tag_length(self._buf, _REASONING_ENDS)]
                # Trailing newlines wait: they are dropped if "</think>" or "<tool_call>" comes next.
                safe = safe.rstrip("\n")
                self._emit_reasoning(events, safe)
                self._buf = self._buf[len(safe):]
                return
        append_event(events, ContentDelta(self._content.push(self._buf)))
        self._buf = ""

    def _emit_reasoning(self, events: list[Event], text: str) -> None:
        append_event(events, ReasoningDelta(self._reasoning.push(text)))
