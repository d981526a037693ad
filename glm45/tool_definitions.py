"""Tool definitions as clients send them (OpenAI `{"type": "function", "function": {...}}` or a bare function
dict), validated once for everyone who reads them: the chat renderer and the tool-call parsers."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any


def normalize_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Validate tool definitions (OpenAI `{"type": "function", "function": {...}}` or a bare function)."""
    if tools is None:
        return None
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise ValueError(f"tools must be a list of tool definitions, got {type(tools).__name__}")
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(
                f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}} "
                f"or a function dict with a 'name'; got {tool!r}"
            )
        try:
            json.dumps(tool)
        except (TypeError, ValueError) as e:
            raise ValueError(f"tools[{i}] is not JSON-serialisable: {e}") from None
        out.append(dict(tool))
    return out
