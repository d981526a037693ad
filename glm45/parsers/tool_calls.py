"""Extract GLM-4.5 tool calls from model output, one-shot and streaming.

The model writes calls as
    <tool_call>NAME\\n<arg_key>K</arg_key>\\n<arg_value>V</arg_value>\\n…</tool_call>
with string values as raw text and other values as JSON. The grammar both modes follow:
- A call runs from `<tool_call>` to the first `</tool_call>`. Without `</tool_call>` (or with nothing
  after `<tool_call>`) it is plain content. So is a call whose name is empty or, when `tools` are
  given, not one of them — the whole `<tool_call>…</tool_call>` text stays in the content.
- NAME is the text up to the first newline or `<`, whitespace stripped.
- Then `<arg_key>K</arg_key>` / `<arg_value>V</arg_value>` pairs; anything else between them is
  ignored. A key without a value is dropped; a value cut short by `</tool_call>` ends there. The last
  of repeated keys wins.
- Values are typed from the tool's JSON schema (`convert_value`).
- Text before, between and after calls is the content, as it is; whitespace-only content is None.

Streaming emits the call's name as soon as it is complete, then the arguments as fragments of one JSON
object (`{"k": "v", "n": 3}`, the same text as `json.dumps(arguments, ensure_ascii=False)`): string
values piece by piece as they arrive, other values whole once their `</arg_value>` is seen, the final
`}` only at `</tool_call>`. Possible tag prefixes are held back, never leaked. The one divergence from
one-shot is inherent to streaming: a call whose name was already sent and that is then cut off before
`</tool_call>` stays a call with unfinished arguments (`ToolCallParser.unterminated` tells), where the
one-shot parse returns its text as content.
"""

from __future__ import annotations

import json
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
from glm45.tool_definitions import normalize_tools

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
ARG_KEY_START, ARG_KEY_END = "<arg_key>", "</arg_key>"
ARG_VALUE_START, ARG_VALUE_END = "<arg_value>", "</arg_value>"


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
    name = body[:name_end].strip()
    if not name or (schemas is not None and name not in schemas):
        return None
    properties = schemas[name] if schemas is not None else {}
    rest, pos, arguments = body[name_end:], 0, {}
    while True:
        key_start = rest.find(ARG_KEY_START, pos)
        if key_start < 0:
            break
        key_end = rest.find(ARG_KEY_END, key_start)
        if key_end < 0:
            break  # the key never closes before </tool_call>: dropped
        key = rest[key_start + len(ARG_KEY_START):key_end].strip()
        pos = key_end + len(ARG_KEY_END)
        value_start = rest.find(ARG_VALUE_START, pos)
        next_key = rest.find(ARG_KEY_START, pos)
        if value_start < 0 or 0 <= next_key < value_start:
            continue  # a key without a value: dropped
        value_end = rest.find(ARG_VALUE_END, value_start)
        raw = rest[value_start + len(ARG_VALUE_START):value_end if value_end >= 0 else len(rest)]
        arguments[key] = convert_value(raw, properties.get(key))  # the last of repeated keys wins
        if value_end < 0:
            break
        pos = value_end + len(ARG_VALUE_END)
    return {"name": name, "arguments": arguments}


# ---------------------------------------------------------------------------------------------------
# Values typed from the JSON schema


def tool_parameter_schemas(tools: Sequence[Mapping[str, Any]] | None) -> dict[str, dict] | None:
    """{tool name: its parameters' `properties`} for OpenAI-style (or bare function) tool definitions."""
    normalized = normalize_tools(tools)
    if normalized is None:
        return None
    schemas: dict[str, dict] = {}
    for tool in normalized:
        fn = tool.get("function", tool)
        parameters = fn.get("parameters")
        properties = parameters.get("properties") if isinstance(parameters, Mapping) else None
        schemas[fn["name"]] = dict(properties) if isinstance(properties, Mapping) else {}
    return schemas


def convert_value(raw: str, schema: Any) -> Any:
    """The argument value for the raw text between `<arg_value>` tags, given the parameter's schema.

    A string parameter keeps the raw text exactly (whitespace included). Otherwise the text is parsed
    as JSON and kept when its type is allowed (`type`, type lists, `anyOf`/`oneOf`, `enum`); when it is
    not, a parameter that may be a string gets the raw text, any other gets the parsed JSON anyway.
    Without a schema (unknown parameter): JSON when the text is JSON, else the raw text.
    """
    types = _allowed_types(schema)
    if types == {"string"}:
        return raw
    try:
        parsed = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return raw
    kind = _json_type(parsed)
    if not types or kind in types or (kind == "integer" and "number" in types):
        return parsed
    return raw if "string" in types else parsed


def _value_is_raw_string(schema: Any) -> bool:
    return _allowed_types(schema) == {"string"}


def _allowed_types(schema: Any) -> set[str]:
    """JSON types a schema allows; empty when it does not constrain the type."""
    if not isinstance(schema, Mapping):
        return set()
    declared = schema.get("type")
    types = {declared} if isinstance(declared, str) else {t for t in declared or () if isinstance(t, str)}
    for key in ("anyOf", "oneOf"):
        for alternative in schema.get(key) or ():
            alternative_types = _allowed_types(alternative)
            if not alternative_types:
                return set()  # one alternative accepts anything
            types |= alternative_types
    if not declared and isinstance(schema.get("enum"), list):
        types |= {_json_type(v) for v in schema["enum"]}
    return types


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# ---------------------------------------------------------------------------------------------------
# Streaming

# What ends the text of each state, earliest first. "name" is special-cased: a newline or any "<".
_STOPS = {
    "content": (TOOL_CALL_START,),
    "raw": (TOOL_CALL_END,),  # a call that turned out not to be one: content up to its end tag
    "between": (ARG_KEY_START, TOOL_CALL_END),
    "key": (ARG_KEY_END, TOOL_CALL_END),
    "after_key": (ARG_VALUE_START, ARG_KEY_START, TOOL_CALL_END),
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
        self._properties: dict[str, Any] = {}
        self._num_args = 0
        self._key = ""
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
            self._take_text(events, self._buf[:len(self._buf) - held], final)
            self._buf = self._buf[len(self._buf) - held:]
            return False
        self._take_text(events, self._buf[:pos], final, stop)
        self._buf = self._buf[pos + len(stop):]
        self._on_stop(events, stop)
        return True

    def _take_text(self, events: list[Event], text: str, final: bool, stop: str | None = None) -> None:
        """Text of the current state up to `stop` (None: all that can be released for now)."""
        state = self._state
        if state == "content":
            self._emit_content(events, text)
        elif state == "raw":
            self._emit_content(events, text + (stop or ""))
        elif state == "key":
            self._key += text
        elif state == "value":
            if self._value_raw_string:
                escaped = json.dumps(text, ensure_ascii=False)[1:-1]
                append_event(events, ToolCallDelta(self.num_calls - 1, escaped))
            else:
                self._value += text
        # "between" and "after_key": stray text inside a call is ignored.

    def _on_stop(self, events: list[Event], stop: str) -> None:
        state = self._state
        if state == "content":
            self._state, self._call_text = "name", stop
        elif state == "raw":
            self._state = "content"
        elif stop == TOOL_CALL_END:
            if state == "value":
                self._close_value(events)
            self._emit_arguments(events, "}" if self._num_args else "{}")
            self._state = "content"
        elif stop == ARG_KEY_START:
            self._state, self._key = "key", ""
        elif stop == ARG_KEY_END:
            self._state = "after_key"
        elif stop == ARG_VALUE_START:
            self._open_value(events)
        else:  # ARG_VALUE_END
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
        name = head[:min(ends)].strip()
        self._call_text += self._buf[:consumed]
        self._buf = self._buf[consumed:]
        if not name or (self._schemas is not None and name not in self._schemas):
            self._emit_content(events, self._call_text)
            self._state = "raw"
            return True
        self._properties = self._schemas[name] if self._schemas is not None else {}
        self._num_args = 0
        self._state = "between"
        events.append(ToolCallDelta(self.num_calls, "", id=self._new_call_id(), name=name))
        self.num_calls += 1
        return True

    def _open_value(self, events: list[Event]) -> None:
        key = self._key.strip()
        schema = self._properties.get(key)
        self._value_raw_string = _value_is_raw_string(schema)
        self._value_schema, self._value = schema, ""
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
