"""Tool-call argument values typed from the tool's JSON schema.

The template writes a string argument as its raw text and any other value as JSON
(`{{ v | tojson if v is not string else v }}`), so the text between `<arg_value>` tags is read back the same
way: a string parameter keeps the text exactly, other parameters get the JSON value. Models do not always
write the JSON spelling, so a non-string parameter also accepts a few other spellings that can mean only one
value of its declared type (`convert_value` lists them); anything else is left as written.
"""

from __future__ import annotations

import ast
import json
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from glm45.tool_definitions import normalize_tools

_NOT_FOUND = object()
_PYTHON_CONSTANTS = {"true": True, "false": False, "null": None, "none": None}


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

    - A string parameter keeps the raw text exactly (whitespace and quotes included) — unless the schema's string
      constraints (`enum`, `const`, `pattern`, `minLength`/`maxLength`) refuse the text and accept it without its
      surrounding whitespace (`\n celsius`): grammars that type arguments (xgrammar's GLM style) allow whitespace
      around such values, as around JSON ones.
    - Without a schema (or one that does not constrain the type): JSON when the text is JSON, else the text.
    - Otherwise JSON of an allowed type (`type`, type lists, `anyOf`/`oneOf`, `enum`) is taken as it is; an
      integral number for an `integer` parameter becomes an int (JSON Schema counts 3.0 as an integer).
    - When the parameter cannot be a string, these spellings are also read as the declared type, because
      each can mean only one value of it: a quoted JSON value (`"42"` → 42, `"true"` → true); `true`/`false`
      and `null`/`None` in any letter case for booleans and null; a Python literal (`{'a': 'b'}`,
      `[True, None]`) or JSON escaped once more as inside a JSON string (`[{\\"id\\": 1}]`) for arrays
      and objects.
    - Anything else is left as written: the raw text when it is not JSON (or the parameter may be a
      string), the JSON value otherwise.
    """
    types = allowed_types(schema)
    if types == {"string"}:
        return _enum_member(raw, schema)
    try:
        parsed = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        parsed = _NOT_FOUND
    if parsed is not _NOT_FOUND and (not types or _fits(parsed, types)):
        return _narrowed(parsed, types)
    if types and "string" not in types:
        spelled = _spelled(parsed if isinstance(parsed, str) else raw, types)
        if spelled is not _NOT_FOUND:
            return spelled
    return raw if parsed is _NOT_FOUND or "string" in types else parsed


def _enum_member(raw: str, schema: Any) -> str:
    stripped = raw.strip()
    if stripped != raw and isinstance(schema, Mapping) and not _string_fits(raw, schema) and \
            _string_fits(stripped, schema):
        return stripped
    return raw


def _string_fits(text: str, schema: Mapping[str, Any]) -> bool:
    """Whether `text` meets the schema's string constraints (those it can check)."""
    choices = schema.get("enum", [schema["const"]] if "const" in schema else None)
    if isinstance(choices, list) and text not in choices:
        return False
    low, high = schema.get("minLength"), schema.get("maxLength")
    if (isinstance(low, int) and len(text) < low) or (isinstance(high, int) and len(text) > high):
        return False
    pattern = schema.get("pattern")
    if isinstance(pattern, str):
        try:
            return re.search(pattern, text) is not None
        except re.error:
            return True
    return True


def value_is_raw_string(schema: Any) -> bool:
    """True when the value is the raw text (so it can be streamed before it is complete)."""
    return allowed_types(schema) == {"string"}


def allowed_types(schema: Any) -> set[str]:
    """JSON types a schema allows; empty when it does not constrain the type."""
    if not isinstance(schema, Mapping):
        return set()
    declared = schema.get("type")
    types = {declared} if isinstance(declared, str) else {t for t in declared or () if isinstance(t, str)}
    for key in ("anyOf", "oneOf"):
        for alternative in schema.get(key) or ():
            alternative_types = allowed_types(alternative)
            if not alternative_types:
                return set()  # one alternative accepts anything
            types |= alternative_types
    if not declared and isinstance(schema.get("enum"), list):
        types |= {json_type(v) for v in schema["enum"]}
    return types


def json_type(value: Any) -> str:
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


def _fits(value: Any, types: set[str]) -> bool:
    kind = json_type(value)
    if kind in types or (kind == "integer" and "number" in types):
        return True
    return kind == "number" and "integer" in types and value.is_integer()


def _narrowed(value: Any, types: set[str]) -> Any:
    if isinstance(value, float) and "integer" in types and "number" not in types and value.is_integer():
        return int(value)
    return value


def _spelled(text: str, types: set[str]) -> Any:
    """The one value of a declared (non-string) type that `text` spells, or _NOT_FOUND."""
    word = text.strip()
    try:
        inner = json.loads(word, parse_constant=_reject_constant)  # the text inside quotes may be JSON
    except (ValueError, RecursionError):
        inner = _NOT_FOUND
    if inner is not _NOT_FOUND and _fits(inner, types):
        return _narrowed(inner, types)
    constant = _PYTHON_CONSTANTS.get(word.lower(), _NOT_FOUND)
    if constant is not _NOT_FOUND and json_type(constant) in types:
        return constant
    if types & {"array", "object"}:
        for candidate in (_python_literal(word), _unescaped_json(word)):
            if candidate is not _NOT_FOUND and json_type(candidate) in types:
                return candidate
    return _NOT_FOUND


def _python_literal(text: str) -> Any:
    if not text.startswith(("[", "{")):
        return _NOT_FOUND
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escapes such as '\d' warn, and are read literally
            value = ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _NOT_FOUND
    return value if _is_json_value(value) else _NOT_FOUND


def _unescaped_json(text: str) -> Any:
    """JSON written as the inside of a JSON string: `[{\\"a\\": 1}]` is `[{"a": 1}]`."""
    if '\\"' not in text:
        return _NOT_FOUND
    try:
        return json.loads(json.loads('"' + text + '"'), parse_constant=_reject_constant)
    except (ValueError, TypeError, RecursionError):
        return _NOT_FOUND


def _is_json_value(value: Any, depth: int = 0) -> bool:
    if depth > 100:
        return False
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_is_json_value(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json_value(v, depth + 1) for k, v in value.items())
    return False  # tuples, sets, bytes, complex numbers: Python, not JSON


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")

