"""The reward of the bundled model's RL stage (`glm45 rl --reward glm45_tiny.rewards:tool_use`).

It judges one answer against what the request declared, the way a client would:
- anything cut off (`finish_reason` other than stop) or malformed (the thinking / `/nothink` format of
  `glm45_tiny.evaluate.format_ok`) scores 0;
- with no tools declared, or no call wanted: 1 when the answer contains no `<tool_call>` at all (and, for an answer
  from a tool's result, mentions each of the row's `must_mention` values in its content), else 0;
- when a call is wanted: 0 without one; 0.1 for call markup that is not exactly one call to a declared tool (the
  parser leaves calls to undeclared tools as text); otherwise 0.3 for naming a declared tool, + 0.3 when the arguments
  fit its schema (required keys present, no unknown keys, JSON types right), + 0.2 when every value is copied from
  the request (strings case-insensitively, numbers as written), + 0.2 when the call is exactly the expected one
  (`expected_call`, a field of the prompt row).
"""

from __future__ import annotations

from typing import Any

from glm45_tiny.evaluate import format_ok

JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict, "array": list}


def _schema(tools: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    for tool in tools:
        function = tool.get("function", tool)
        if function.get("name") == name:
            return function.get("parameters") or {"type": "object", "properties": {}}
    return None


def arguments_fit(arguments: Any, schema: dict[str, Any]) -> bool:
    """Required keys present, no undeclared keys, each value of its declared JSON type (and in its enum)."""
    if not isinstance(arguments, dict):
        return False
    properties = schema.get("properties", {})
    if any(key not in arguments for key in schema.get("required", [])):
        return False
    for key, value in arguments.items():
        spec = properties.get(key)
        if spec is None:
            return False
        kind = JSON_TYPES.get(spec.get("type"))
        if kind is not None and (not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool)):
            return False
        if "enum" in spec and value not in spec["enum"]:
            return False
    return True


def copied_from(arguments: dict[str, Any], request: str) -> bool:
    """Every argument value appears in the request text."""
    text = request.lower()
    for value in arguments.values():
        if isinstance(value, bool) or value is None:
            return False
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if str(value).lower() not in text:
            return False
    return True


def tool_use(prompt: dict[str, Any], completion: dict[str, Any], expected_call: dict[str, Any] | None = None,
             must_mention: list[str] | None = None, **_: Any) -> float:
    text = completion["text"]
    if completion["finish_reason"] != "stop" or not format_ok(text, prompt["enable_thinking"], True):
        return 0.0
    tools = prompt["tools"]
    wrote_call = "<tool_call>" in text
    if not tools or expected_call is None:
        if must_mention is not None and not all(v in (completion["content"] or "") for v in must_mention):
            return 0.0
        return 0.0 if wrote_call else 1.0
    calls = completion["tool_calls"]
    if not wrote_call:
        return 0.0
    if len(calls) != 1:
        return 0.1
    call = calls[0]
    schema = _schema(tools, call["name"])
    if schema is None:
        return 0.1
    request = next(m["content"] for m in reversed(prompt["messages"]) if m["role"] == "user")
    score = 0.3
    if arguments_fit(call["arguments"], schema):
        score += 0.3
    if isinstance(call["arguments"], dict) and copied_from(call["arguments"], request):
        score += 0.2
    if call["name"] == expected_call["name"] and call["arguments"] == expected_call["arguments"]:
        score += 0.2
    return round(score, 6)
