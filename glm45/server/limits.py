"""Bounds on every request field that scales the server's work, and the checks that need more than a JSON type.

Each bound keeps one request from costing the others: the engine thread runs every sequence's stop matching and
sampling, so the number of sequences, stop strings and their bytes are capped; tools are rendered into the
prompt and parsed against, so their count, size and nesting are capped and each `parameters` must be a valid
JSON Schema. Every refusal is a 400 naming the field. `check_json` refuses input that cannot be used at all —
lone surrogates (not text: they cannot be encoded) and nesting deeper than any real request needs — while the
body is validated, so that nothing later trips over it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from glm45.server.errors import RequestError

MAX_SEQUENCES = 256              # prompts × n of one request
MAX_STOP_STRINGS = 64
MAX_STOP_BYTES = 16 * 1024       # all stop strings together, UTF-8
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 300
MAX_TOOLS = 128
MAX_TOOL_BYTES = 64 * 1024       # one tool definition, as JSON
MAX_TOOLS_BYTES = 512 * 1024     # all of them
MAX_SCHEMA_DEPTH = 32            # nesting of a tool's `parameters`
MAX_JSON_DEPTH = 64              # nesting anywhere in a request body

_SURROGATE = re.compile("[\ud800-\udfff]")
_SCALARS = {int, float, bool, type(None)}


def _where(path: tuple) -> str:
    shown = ".".join(map(str, path[:6]))
    return shown + (f".… ({len(path)} levels)" if len(path) > 6 else "")


class UnusableInput(ValueError):
    """A request value that cannot be used; `where` is its path in the body (`messages.0.content`)."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}" if where else message)
        self.where = where


def _has_surrogate(text: str) -> bool:
    return not text.isascii() and _SURROGATE.search(text) is not None


def check_json(value: Any, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Raise `UnusableInput` for a lone surrogate anywhere (keys included) or nesting deeper than `max_depth`.
    Iterative, so that no nesting can exhaust the stack."""
    stack: list[tuple[Any, int, tuple]] = [(value, 0, ())]
    while stack:
        item, depth, path = stack.pop()
        kind = type(item)
        if kind is str:
            if _has_surrogate(item):
                raise UnusableInput(_where(path), "contains a lone UTF-16 surrogate, which is not text")
            continue
        if kind is not dict and kind is not list:
            continue
        if depth >= max_depth:
            raise UnusableInput(_where(path), f"is nested deeper than {max_depth} levels")
        if kind is list:
            if item and set(map(type, item)) <= _SCALARS:  # e.g. token ids: nothing to look into
                continue
            children = enumerate(item)
        else:
            children = item.items()
        for key, child in children:
            if kind is dict and type(key) is str and _has_surrogate(key):
                raise UnusableInput(_where(path), f"has a key {key!r} with a lone surrogate")
            if type(child) in (str, dict, list):
                stack.append((child, depth + 1, (*path, key)))


def check_sequences(num_prompts: int, n: int) -> None:
    if num_prompts * n > MAX_SEQUENCES:
        raise RequestError(f"this request asks for {num_prompts} prompt(s) × n={n} = {num_prompts * n} sequences; "
                           f"at most {MAX_SEQUENCES} are allowed per request",
                           param="n" if num_prompts == 1 else "prompt")


def check_sampling(stop: str | Sequence[str] | None, stop_token_ids: Sequence[int] | None,
                   logit_bias: Mapping[str, float] | None) -> None:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(f"stop has {len(stops)} strings; at most {MAX_STOP_STRINGS} are allowed", param="stop")
    size = sum(len(s.encode("utf-8")) for s in stops)
    if size > MAX_STOP_BYTES:
        raise RequestError(f"stop strings have {size} bytes in all; at most {MAX_STOP_BYTES} are allowed", param="stop")
    if stop_token_ids is not None and len(stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise RequestError(f"stop_token_ids has {len(stop_token_ids)} ids; at most {MAX_STOP_TOKEN_IDS} are allowed",
                           param="stop_token_ids")
    if logit_bias is not None and len(logit_bias) > MAX_LOGIT_BIAS:
        raise RequestError(f"logit_bias has {len(logit_bias)} entries; at most {MAX_LOGIT_BIAS} are allowed",
                           param="logit_bias")


def check_schema(schema: Any, where: str) -> None:
    """A JSON Schema a request gives (tool parameters, a response format): nested at most `MAX_SCHEMA_DEPTH`, and
    valid by the `jsonschema` package's meta-schemas."""
    from jsonschema import SchemaError
    from jsonschema.validators import validator_for

    try:
        check_json(schema, MAX_SCHEMA_DEPTH)
    except UnusableInput as e:
        raise RequestError(f"{where} {e}", param=where) from None
    if not isinstance(schema, (dict, bool)):
        raise RequestError(f"{where} must be a JSON Schema (an object or a boolean)", param=where)
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as e:
        at = "".join(f"[{p!r}]" for p in e.path)
        raise RequestError(f"{where} is not a valid JSON Schema: {e.message}" + (f" (at {at})" if at else ""),
                           param=where) from None


def check_tools(tools: Sequence[Mapping[str, Any]] | None) -> None:
    """Count, size, nesting, and `parameters` a valid JSON Schema (the `jsonschema` package's meta-schemas)."""
    if not tools:
        return
    if len(tools) > MAX_TOOLS:
        raise RequestError(f"tools has {len(tools)} definitions; at most {MAX_TOOLS} are allowed", param="tools")
    total = 0
    for i, tool in enumerate(tools):
        size = len(json.dumps(tool, ensure_ascii=False).encode("utf-8"))
        total += size
        if size > MAX_TOOL_BYTES:
            raise RequestError(f"tools[{i}] has {size} bytes of JSON; at most {MAX_TOOL_BYTES} are allowed",
                               param=f"tools[{i}]")
        parameters = (tool.get("function") or {}).get("parameters")
        if parameters is not None:
            check_schema(parameters, f"tools[{i}].function.parameters")
    if total > MAX_TOOLS_BYTES:
        raise RequestError(f"tools have {total} bytes of JSON in all; at most {MAX_TOOLS_BYTES} are allowed",
                           param="tools")


def check_logit_bias(logit_bias: Mapping[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's `logit_bias` ({"token id": bias}) → {token id: bias}: ids inside the vocabulary, biases in
    [-100, 100] (the size is bounded by `check_sampling`)."""
    if not logit_bias:
        return None
    out = {}
    for key, bias in logit_bias.items():
        token = int(key) if isinstance(key, str) and key.strip().isdigit() else None
        if token is None or token >= vocab_size:
            raise RequestError(f"logit_bias keys must be token ids in [0, {vocab_size}), got {key!r}",
                               param="logit_bias")
        if not -100.0 <= bias <= 100.0:
            raise RequestError(f"logit_bias values must be in [-100, 100], got {bias} for token {key}",
                               param="logit_bias")
        out[token] = float(bias)
    return out
