"""Extract GLM-4.5 tool calls from model output, one-shot and streaming.

The model writes calls as
    <tool_call>NAME\\n<arg_key>K</arg_key>\\n<arg_value>V</arg_value>\\n…</tool_call>
with string values as raw text and other values as JSON. The grammar both modes follow:
- A call runs from `<tool_call>` to the first `</tool_call>`. Without `</tool_call>` (or with nothing
  after `<tool_call>`) it is plain content. So is a call whose name is empty or, when `tools` are
  given, not one of them — the whole `<tool_call>…</tool_call>` text stays in the content.
- NAME is the text up to the first newline or `<`, with whitespace and literal two-character `\\n`
  sequences stripped from both ends (models sometimes write the backslash-n instead of a newline).
- Then `<arg_key>K</arg_key>` / `<arg_value>V</arg_value>` pairs; other text between pairs is ignored.
  The last of repeated keys wins.
- A value ends at the first `</arg_value>` that is followed, after whitespace and literal `\\n`s, by
  `<arg_key>` or the end of the call; any other `</arg_value>` is part of the value (a model editing
  parser code writes the tag as data). A value still open at `</tool_call>` ends there, so a string
  value cannot contain a literal `</tool_call>`: the template writes string values unescaped, so such
  a value is ambiguous in the prompt as well.
- A key whose `<arg_value>` is missing but whose value is closed by `</arg_value>` (seen from GLM models
  under load, vllm#49248) gets the text between the tags, less the one newline the template puts after
  `</arg_key>`. A key with no value at all is skipped, and a warning names the tool and the key.
- Values are typed from the tool's JSON schema (`glm45.parsers.values.convert_value`).
- Text before, between and after calls is the content, as it is; whitespace-only content is None.

Streaming emits the call's name as soon as it is complete, then the arguments as fragments of one JSON
object (`{"k": "v", "n": 3}`, the same text as `json.dumps(arguments, ensure_ascii=False)`): string
values piece by piece as they arrive, other values whole once they are closed, the final `}` only at
`</tool_call>`. Possible tag prefixes are held back, never leaked, and so is a `</arg_value>` until what
follows it decides whether it closes the value. The one divergence from one-shot is inherent to
streaming: a call whose name was already sent and that is then cut off before `</tool_call>` stays a
call with unfinished arguments (`ToolCallParser.unterminated` tells), where the one-shot parse returns
its text as content.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from glm45.parsers.events import (
    ContentDelta,
    Event,
    LeadingBlankHold,
    ToolCallDelta,
    append_event,
    find_first,
    none_if_blank,
    partial_tag_length,
)
from glm45.parsers.values import convert_value, tool_parameter_schemas, value_is_raw_string

logger = logging.getLogger(__name__)

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
ARG_KEY_START, ARG_KEY_END = "<arg_key>", "</arg_key>"
ARG_VALUE_START, ARG_VALUE_END = "<arg_value>", "</arg_value>"

# Whitespace and the two-character sequence backslash-n: what may separate tags.
_GAP = re.compile(r"(?:\s|\\n)*")
_GAP_AT_ENDS = re.compile(r"^(?:\s|\\n)*(.*?)(?:\s|\\n)*$", re.DOTALL)

__all__ = ["ToolCallParser", "convert_value", "parse_tool_calls", "tool_parameter_schemas"]


def parse_tool_calls(
    text: str, tools: Sequence[Mapping[str, Any]] | None = None
) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, calls) of a complete model output; each call is `{"name": str, "arguments": dict}`.

    With `tools=None` any name is accepted and every value is parsed as JSON when it is JSON; with a list
    of tools, calls to other names are content and values follow each tool's parameter schema.
    """
    schemas = tool_parameter_schemas(tools)
    content: list[str] = []
    calls: list[dict[str, Any]] = []
    pos = 0
    while True:
        start = text.find(TOOL_CALL_START, pos)
        if start < 0:
            content.append(text[pos:])
            break
        content.append(text[pos:start])
        body_start = start + len(TOOL_CALL_START)
        end = text.find(TOOL_CALL_END, body_start)
        if end < 0:
            content.append(text[start:])
            break
        call = _parse_call_body(text[body_start:end], schemas)
        if call is None:
            content.append(text[start:end + len(TOOL_CALL_END)])
        else:
            calls.append(call)
        pos = end + len(TOOL_CALL_END)
    return none_if_blank("".join(content)), calls


def _parse_call_body(body: str, schemas: dict[str, dict] | None) -> dict[str, Any] | None:
    body = body.lstrip()
    name_end = min((i for i in (body.find("\n"), body.find("<")) if i >= 0), default=len(body))
    name = _strip_gaps(body[:name_end])
    if not name or (schemas is not None and name not in schemas):
        return None
    properties = schemas[name] if schemas is not None else {}
    # The end tag put back, so that "the end of the call" reads as in the streaming parser.
    rest, pos, arguments = body[name_end:] + TOOL_CALL_END, 0, {}
    while True:
        key_start = rest.find(ARG_KEY_START, pos)
        if key_start < 0:
            break
        key_open = key_start + len(ARG_KEY_START)
        key_end, tag = find_first(rest[key_open:], (ARG_KEY_END, TOOL_CALL_END))
        if tag == TOOL_CALL_END:
            _warn_key_without_value(name, rest[key_open:-len(TOOL_CALL_END)].strip())
            break
        key = rest[key_open:key_open + key_end].strip()
        raw, pos = _find_value(rest, key_open + key_end + len(ARG_KEY_END))
        if raw is None:
            _warn_key_without_value(name, key)
        else:
            arguments[key] = convert_value(raw, properties.get(key))
    return {"name": name, "arguments": arguments}


def _find_value(rest: str, pos: int) -> tuple[str | None, int]:
    """(raw value, position after it) for a key closed just before `pos`; (None, position of what comes
    next) when the key has no value."""
    scan = pos
    while True:
        offset, tag = find_first(rest[scan:], (ARG_VALUE_START, ARG_KEY_START, ARG_VALUE_END, TOOL_CALL_END))
        at = scan + offset
        if tag == ARG_VALUE_START:
            return _value_from(rest, at + len(ARG_VALUE_START))
        if tag == ARG_VALUE_END:
            if _closes_value(rest, at + len(ARG_VALUE_END), final=True):
                return _without_separator(rest[pos:at]), at + len(ARG_VALUE_END)
            scan = at + len(ARG_VALUE_END)
            continue
        return None, at  # "<arg_key>" or the end of the call


def _value_from(rest: str, start: int) -> tuple[str, int]:
    scan = start
    while True:
        offset, tag = find_first(rest[scan:], (ARG_VALUE_END, TOOL_CALL_END))
        at = scan + offset
        if tag == TOOL_CALL_END:
            return rest[start:at], at  # cut short by the end of the call
        if _closes_value(rest, at + len(ARG_VALUE_END), final=True):
            return rest[start:at], at + len(ARG_VALUE_END)
        scan = at + len(ARG_VALUE_END)


def _closes_value(text: str, after: int, final: bool) -> bool | None:
    """Whether the `</arg_value>` ending just before `after` closes the value: what follows it, past
    whitespace and literal `\\n`s, is `<arg_key>` or `</tool_call>`. None when `text` ends too early to
    tell (only while streaming)."""
    rest = text[_GAP.match(text, after).end():]
    if rest.startswith((ARG_KEY_START, TOOL_CALL_END)):
        return True
    undecided = rest in ("", "\\") or ARG_KEY_START.startswith(rest) or TOOL_CALL_END.startswith(rest)
    return None if undecided and not final else False


def _strip_gaps(text: str) -> str:
    return _GAP_AT_ENDS.match(text).group(1)


def _without_separator(text: str) -> str:
    """A value found without its `<arg_value>`, less the newline the template puts after `</arg_key>`."""
    for separator in ("\n", "\\n"):
        if text.startswith(separator):
            return text[len(separator):]
    return text


def _warn_key_without_value(tool: str, key: str) -> None:
    logger.warning("tool call %r: argument %r has no <arg_value>; skipped", tool, key)


# ---------------------------------------------------------------------------------------------------
# Streaming

# What ends the text of each state, earliest first. "name" is special-cased: a newline or any "<".
_STOPS = {
    "content": (TOOL_CALL_START,),
    "raw": (TOOL_CALL_END,),  # a call that turned out not to be one: content up to its end tag
    "between": (ARG_KEY_START, TOOL_CALL_END),
    "key": (ARG_KEY_END, TOOL_CALL_END),
    "after_key": (ARG_VALUE_START, ARG_KEY_START, ARG_VALUE_END, TOOL_CALL_END),
    "value": (ARG_VALUE_END, TOOL_CALL_END),
}
_IN_CALL = ("between", "key", "after_key", "value")


def _new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallParser:
    """Streaming `parse_tool_calls`: `feed(delta)` and `finish()` return ContentDelta/ToolCallDelta events.

    For any chunking, the joined content and the calls rebuilt from the deltas (arguments = the joined
    fragments, parsed as JSON) equal `parse_tool_calls(whole_text, tools)` — except for a call cut off
    after its name was sent (see the module docstring).
    """

    def __init__(
        self, tools: Sequence[Mapping[str, Any]] | None = None, new_call_id: Callable[[], str] = _new_call_id
    ):
        self._schemas = tool_parameter_schemas(tools)
        self._new_call_id = new_call_id
        self._state = "content"
        self._buf = ""
        self._content = LeadingBlankHold(strip_newlines=False)
        self.num_calls = 0
        # The call being streamed
        self._name = ""
        self._call_text = ""
        self._properties: dict[str, Any] = {}
        self._num_args = 0
        self._key = ""
        self._after_key = ""  # text after </arg_key>: the value if "<arg_value>" turns out to be missing
        self._value_schema: Any = None
        self._value_raw_string = False
        self._value = ""

    @property
    def unterminated(self) -> bool:
        """True when the output ended inside a call whose name was already emitted."""
        return self._state in _IN_CALL

    def feed(self, text: str) -> list[Event]:
        self._buf += text
        events: list[Event] = []
        while self._step(events, final=False):
            pass
        return events

    def finish(self) -> list[Event]:
        events: list[Event] = []
        while self._step(events, final=True):
            pass
        return events

    def _step(self, events: list[Event], final: bool) -> bool:
        """Consume what the current state can; True when the state changed and there may be more."""
        if self._state == "name":
            return self._step_name(events, final)
        stops = _STOPS[self._state]
        pos, stop = find_first(self._buf, stops)
        if stop is None:
            held = 0 if final else partial_tag_length(self._buf, stops)
            self._take_text(events, self._buf[:len(self._buf) - held])
            self._buf = self._buf[len(self._buf) - held:]
            return False
        end = pos + len(stop)
        if stop == ARG_VALUE_END:
            closes = _closes_value(self._buf, end, final)
            if closes is None:  # wait for what follows the tag
                self._take_text(events, self._buf[:pos])
                self._buf = self._buf[pos:]
                return False
            if not closes:  # a literal "</arg_value>" inside the value
                self._take_text(events, self._buf[:end])
                self._buf = self._buf[end:]
                return True
        self._take_text(events, self._buf[:pos], stop)
        self._buf = self._buf[end:]
        self._on_stop(events, stop)
        return True

    def _take_text(self, events: list[Event], text: str, stop: str | None = None) -> None:
        """Text of the current state up to `stop` (None: all that can be released for now)."""
        state = self._state
        if state == "content":
            self._emit_content(events, text)
        elif state == "raw":
            self._emit_content(events, text + (stop or ""))
        elif state == "key":
            self._key += text
        elif state == "after_key":
            self._after_key += text
        elif state == "value":
            if self._value_raw_string:
                escaped = json.dumps(text, ensure_ascii=False)[1:-1]
                append_event(events, ToolCallDelta(self.num_calls - 1, escaped))
            else:
                self._value += text
        # "between": stray text inside a call is ignored.

    def _on_stop(self, events: list[Event], stop: str) -> None:
        state = self._state
        if state == "content":
            self._state, self._call_text = "name", stop
        elif state == "raw":
            self._state = "content"
        elif state == "after_key" and stop != ARG_VALUE_START:
            if stop == ARG_VALUE_END:  # the value without its opening tag
                self._open_value(events)
                self._take_text(events, _without_separator(self._after_key))
                self._close_value(events)
                self._state = "between"
            else:
                _warn_key_without_value(self._name, self._key.strip())
                self._state = "between"
                self._on_stop(events, stop)  # "<arg_key>" or "</tool_call>", as between pairs
        elif stop == TOOL_CALL_END:
            if state == "value":
                self._close_value(events)
            elif state == "key":
                _warn_key_without_value(self._name, self._key.strip())
            self._emit_arguments(events, "}" if self._num_args else "{}")
            self._state = "content"
        elif stop == ARG_KEY_START:
            self._state, self._key = "key", ""
        elif stop == ARG_KEY_END:
            self._state, self._after_key = "after_key", ""
        elif stop == ARG_VALUE_START:
            self._open_value(events)
        else:  # ARG_VALUE_END closing a value
            self._close_value(events)
            self._state = "between"

    def _step_name(self, events: list[Event], final: bool) -> bool:
        head = self._buf.lstrip()
        ends = [i for i in (head.find("\n"), head.find("<")) if i >= 0]
        if not ends:
            if final:  # "<tool_call>" and a name, then the end of the output: plain content
                self._emit_content(events, self._call_text + self._buf)
                self._buf = ""
            return False
        consumed = len(self._buf) - len(head) + min(ends)
        name = _strip_gaps(head[:min(ends)])
        self._call_text += self._buf[:consumed]
        self._buf = self._buf[consumed:]
        if not name or (self._schemas is not None and name not in self._schemas):
            self._emit_content(events, self._call_text)
            self._state = "raw"
            return True
        self._name = name
        self._properties = self._schemas[name] if self._schemas is not None else {}
        self._num_args = 0
        self._state = "between"
        events.append(ToolCallDelta(self.num_calls, "", id=self._new_call_id(), name=name))
        self.num_calls += 1
        return True

    def _open_value(self, events: list[Event]) -> None:
        key = self._key.strip()
        self._value_schema = self._properties.get(key)
        self._value_raw_string = value_is_raw_string(self._value_schema)
        self._value = ""
        prefix = ", " if self._num_args else "{"
        opening = '"' if self._value_raw_string else ""
        self._emit_arguments(events, prefix + json.dumps(key, ensure_ascii=False) + ": " + opening)
        self._num_args += 1
        self._state = "value"

    def _close_value(self, events: list[Event]) -> None:
        if self._value_raw_string:
            self._emit_arguments(events, '"')
        else:
            value = convert_value(self._value, self._value_schema)
            self._emit_arguments(events, json.dumps(value, ensure_ascii=False))

    def _emit_arguments(self, events: list[Event], fragment: str) -> None:
        append_event(events, ToolCallDelta(self.num_calls - 1, fragment))

    def _emit_content(self, events: list[Event], text: str) -> None:
        append_event(events, ContentDelta(self._content.push(text)))
