"""GLM-4.5's tool-call format as grammars (xgrammar structural tags).

A call is `<tool_call>NAME\\n<arg_key>K</arg_key>\\n<arg_value>V</arg_value>\\n…</tool_call>`: string values are
raw text, other values JSON (the template's `tojson`). xgrammar's `glm_xml` style of `JSONSchemaFormat` is
exactly this argument list, typed by the tool's JSON Schema (required keys present, declared order, each value of
its type; whitespace between the tags as the template writes it). Names are the declared ones; what follows a
name is the argument list, or, when only the name is constrained, a newline or `<arg_key>` and then free text
up to `</tool_call>` — so a declared name is never extended into an undeclared one ("get" → "get_weather2").

The formats here start where the model takes over: after the prompt's prefilled `<tool_call>` (tool_choice
"required") or `<tool_call>NAME\\n` (a named function), after the `<tool_call>` the model wrote itself ("auto"), or
with the `<tool_call>` (a JSON answer that may instead call a tool).
"""

from __future__ import annotations

from typing import Any

from glm45.grammar.spec import ToolCallConstraint, ToolCallMode, tool_name, tool_parameters

CALL_START, CALL_END = "<tool_call>", "</tool_call>"
MAX_WHITESPACE = 2  # between the tags of an argument list: the template's "\n", and one more
# Never inside a string value: `</tool_call>` always ends a call for the parser (the template writes strings raw, so
# a value holding it is ambiguous), and the argument tags would read as the next argument.
VALUE_EXCLUDES = ["<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>"]


def _st():
    from xgrammar import structural_tag

    return structural_tag


def sequence_format(elements: list[Any]) -> Any:
    return _st().SequenceFormat(elements=elements)


def or_format(elements: list[Any]) -> Any:
    return elements[0] if len(elements) == 1 else _st().OrFormat(elements=elements)


def regex_format(pattern: str) -> Any:
    return _st().RegexFormat(pattern=pattern)


JSON_CHAR = '[^"\\\\\\x00-\\x1f]'  # a character a JSON string holds as it is (no quote, backslash, control)
RAW_CHAR = "[^<]"  # a character of a raw GLM argument value that cannot start a tag


def lengths_as_patterns(schema: Any, char: str) -> Any:
    """`schema` with untyped enums of strings typed as strings, and each string's `minLength`/`maxLength` written
    as a pattern (`^char{min,max}$`). xgrammar's own length-bounded strings let raw control characters through
    (invalid JSON), and it drops length bounds on strings it filters with `excludes` (of GLM's tags in argument
    values) while keeping patterns, which it does not filter; `char` keeps such strings valid JSON (`JSON_CHAR`) or
    free of tags (`RAW_CHAR`), a little stricter than the schema."""
    if isinstance(schema, list):
        return [lengths_as_patterns(item, char) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: lengths_as_patterns(value, char) for key, value in schema.items()}
    choices = out.get("enum", [out["const"]] if "const" in out else None)
    if "type" not in out and choices and all(isinstance(c, str) for c in choices):
        out["type"] = "string"  # an untyped enum of strings is a string: raw text, as the parser reads it
    bounded = "minLength" in out or "maxLength" in out
    if bounded and out.get("type") == "string" and "pattern" not in out and "format" not in out:
        low, high = int(out.pop("minLength", 0)), out.pop("maxLength", None)
        out["pattern"] = f"^{char}{{{low},{'' if high is None else int(high)}}}$"
    return out


def _arguments(tool: Any, typed: bool) -> Any:
    st = _st()
    if typed:
        return st.JSONSchemaFormat(json_schema=lengths_as_patterns(dict(tool_parameters(tool)), RAW_CHAR),
                                   style="glm_xml",
                                   max_whitespace_cnt=MAX_WHITESPACE, excludes=VALUE_EXCLUDES)
    # Name only: the name ends at a newline, `<arg_key>` or `</tool_call>`; the rest is free up to the end tag.
    after_name = st.SequenceFormat(elements=[st.RegexFormat(pattern="[ \t]*\n|<arg_key>"),
                                             st.AnyTextFormat(excludes=[CALL_START])])
    return st.OrFormat(elements=[st.ConstStringFormat(value=""), after_name])


def _calls(calls: ToolCallConstraint, prefix: str, typed: bool) -> Any:
    """One call to any declared tool, from `prefix` + NAME to `</tool_call>`."""
    st = _st()
    return or_format([st.TagFormat(begin=prefix + tool_name(tool), content=_arguments(tool, typed), end=CALL_END)
                      for tool in calls.tools])


def _more_calls(calls: ToolCallConstraint, first: Any, typed: bool) -> Any:
    """`first`, then (when parallel calls are allowed) any number of further calls, each on its own line."""
    if not calls.parallel:
        return first
    st = _st()
    again = st.SequenceFormat(elements=[st.RegexFormat(pattern="\n?"), _calls(calls, CALL_START, typed)])
    return st.SequenceFormat(elements=[first, st.StarFormat(content=again)])


def forced_calls_format(calls: ToolCallConstraint) -> Any:
    """tool_choice "required" (after the prefilled `<tool_call>`) or a named function (after `<tool_call>NAME\\n`):
    arguments always typed."""
    st = _st()
    if calls.mode == ToolCallMode.NAMED:
        tool = next(t for t in calls.tools if tool_name(t) == calls.tool_name)
        return st.SequenceFormat(elements=[_arguments(tool, True), st.ConstStringFormat(value=CALL_END)])
    return _more_calls(calls, _calls(calls, "", True), True)


def opened_calls_format(calls: ToolCallConstraint) -> Any:
    """Calls written from their `<tool_call>` on (the alternative to a JSON answer)."""
    typed = calls.mode != ToolCallMode.AUTO_NAME
    return _more_calls(calls, _calls(calls, CALL_START, typed), typed)


def triggered_call_format(calls: ToolCallConstraint) -> Any:
    """One call after the `<tool_call>` the model wrote (tool_choice "auto" with --tool-call-constraint)."""
    return _calls(calls, "", calls.mode == ToolCallMode.AUTO_FULL)
