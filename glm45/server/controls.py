"""The decoding controls a chat request sends, read into what the engine takes, or refused before anything runs.

- The answer's format: OpenAI's `response_format` (`json_object`, or `json_schema` with `name`, `schema`,
  `strict` — enforced either way), vLLM's `structured_outputs` (`json`, `json_object`, `regex`, `choice`,
  `grammar`) and its older `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`. At most one.
- `reasoning_effort` onto GLM-4.5's thinking (`REASONING_EFFORT`): "none" and "minimal" turn thinking off;
  "low" and "medium" think with a budget of 1,024 and 4,096 tokens (at most half of `max_tokens`); "high" thinks
  without one. The request's own `chat_template_kwargs.enable_thinking` and `thinking_budget` win over it.
- `thinking_budget`: tokens of thought after which the engine writes `</think>` (less than `max_tokens`).
The grammar that results is compiled here (in a worker thread) with the engine's grammar backend, so a schema it
cannot compile is a 400 with the engine's reason; the engine then finds it in the compile cache.
"""

from __future__ import annotations

import json
from typing import Any

from glm45.grammar import GrammarError, StructuredOutputsParams
from glm45.server.errors import RequestError
from glm45.server.limits import check_schema

# reasoning_effort → (enable_thinking, thinking budget in tokens or None)
REASONING_EFFORT = {"none": (False, None), "minimal": (False, None), "low": (True, 1024), "medium": (True, 4096),
                    "high": (True, None)}


def _json_schema(value: Any, where: str) -> dict | bool:
    if isinstance(value, str):  # guided_json may come as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RequestError(f"{where} is not valid JSON: {e}", param=where) from None
    check_schema(value, where)
    return value


def answer_format(request: Any) -> dict[str, Any]:
    """`StructuredOutputsParams` fields for the answer ({} when the answer is free text)."""
    found: list[tuple[str, dict[str, Any]]] = []
    fmt = request.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(("response_format", {"json_object": True}))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise RequestError('response_format {"type": "json_schema"} needs json_schema.schema',
                               param="response_format.json_schema")
        found.append(("response_format", {"json": _json_schema(fmt.json_schema.schema_,
                                                               "response_format.json_schema.schema")}))
    so = request.structured_outputs
    if so is not None:
        fields = {"json": None if so.json_ is None else _json_schema(so.json_, "structured_outputs.json"),
                  "json_object": so.json_object or False, "regex": so.regex,
                  "choice": tuple(so.choice) if so.choice is not None else None, "grammar": so.grammar}
        found.append(("structured_outputs", {k: v for k, v in fields.items() if v not in (None, False)}))
    if request.guided_json is not None:
        found.append(("guided_json", {"json": _json_schema(request.guided_json, "guided_json")}))
    for name, key in (("guided_regex", "regex"), ("guided_grammar", "grammar")):
        if getattr(request, name) is not None:
            found.append((name, {key: getattr(request, name)}))
    if request.guided_choice is not None:
        found.append(("guided_choice", {"choice": tuple(request.guided_choice)}))
    found = [(name, fields) for name, fields in found if fields]
    if len(found) > 1 or (found and len(found[0][1]) > 1):
        names = ", ".join(name for name, _ in found)
        raise RequestError(f"give one answer format; this request has several ({names})", param=found[0][0])
    return found[0][1] if found else {}


def thinking_kwargs(request: Any) -> dict[str, Any]:
    """Chat template kwargs from `reasoning_effort` (under the request's own `chat_template_kwargs`)."""
    kwargs = {}
    if request.reasoning_effort is not None:
        kwargs["enable_thinking"] = REASONING_EFFORT[request.reasoning_effort][0]
    return {**kwargs, **(request.chat_template_kwargs or {})}


def thinking_budget(request: Any, max_tokens: int | None) -> int | None:
    """The request's `thinking_budget`, else the one its `reasoning_effort` implies (at most half of max_tokens)."""
    if request.thinking_budget is not None:
        if max_tokens is not None and request.thinking_budget >= max_tokens:
            raise RequestError(f"thinking_budget ({request.thinking_budget}) must be less than max_tokens "
                               f"({max_tokens}), so that the answer has room", param="thinking_budget")
        return request.thinking_budget
    budget = REASONING_EFFORT[request.reasoning_effort][1] if request.reasoning_effort is not None else None
    if budget is not None and max_tokens is not None:
        budget = min(budget, max_tokens // 2)
    return budget


def check_grammar(engine: Any, spec: StructuredOutputsParams | None, param: str) -> None:
    """Compile `spec`'s grammars (blocking: call it in a worker thread); a 400 naming `param` if they cannot be."""
    if spec is None:
        return
    try:
        engine.grammar.check(spec)
    except GrammarError as e:
        raise RequestError(str(e), param=param) from None
    except ValueError as e:  # no tokenizer, or a spec that contradicts itself
        raise RequestError(str(e), param=param) from None


def structured_outputs(plan: Any, answer: dict[str, Any]) -> StructuredOutputsParams | None:
    try:
        return plan.structured_outputs(**answer)
    except ValueError as e:
        raise RequestError(str(e), param="response_format" if answer else "tool_choice") from None
