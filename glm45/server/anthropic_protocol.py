"""The Anthropic Messages wire format (`POST /v1/messages`), as pydantic models, and its mapping onto a GLM-4.5 chat.

What a request means here is what it means to Anthropic's API, read onto the chat that `glm45.chat` renders:
- `system` (a string or text blocks) → a system message; `messages` → user, assistant and tool messages: a
  user turn's `tool_result` blocks become tool messages (GLM's `<|observation|>`), in order, before its text; an
  assistant turn's `thinking` becomes its reasoning, `tool_use` its tool calls (`input` as the arguments);
- `tools` (`name`, `description`, `input_schema`) → function tools; `tool_choice` auto / any / tool / none →
  "auto" / "required" / the named function / "none", `disable_parallel_tool_use` → one call at most;
- `thinking`: "enabled" (with `budget_tokens`, less than `max_tokens`: the engine closes the thought there),
  "adaptive" or "between_tools" → thinking on; "disabled" or absent → off (Anthropic's default);
- `output_config.format` (or the older `output_format`) `{"type": "json_schema", "schema": …}` → the answer is
  constrained to the schema (`glm45.grammar`); `output_config.effort` low / medium → a thinking budget of 1,024 /
  4,096 tokens when thinking is on without one (at most half of `max_tokens`);
- `max_tokens`, `stop_sequences`, `temperature`, `top_p`, `top_k` → sampling; `metadata` is accepted and unused.
Images, documents and server tools are refused with a 400 (the model reads text only). Unknown fields are
accepted and ignored, as on the OpenAI side, so a newer client keeps working.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from glm45.server.errors import RequestError
from glm45.server.protocol import RequestBody

ANTHROPIC_PREFIX = "/v1/messages"
# Anthropic's error types by HTTP status.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 408: "timeout_error", 413: "request_too_large", 429: "rate_limit_error",
               500: "api_error", 503: "overloaded_error", 529: "overloaded_error"}


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}


def message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


class Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


class AnthropicTool(Loose):
    name: str
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    type: str | None = None  # "custom" or absent; server tools (web search, code execution) are refused


class AnthropicToolChoice(Loose):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class ThinkingConfig(Loose):
    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: int | None = Field(None, ge=0)


class AnthropicMessage(Loose):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class MessagesRequest(RequestBody):
    model: str
    max_tokens: int = Field(ge=1)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: ThinkingConfig | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    metadata: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None
    output_format: dict[str, Any] | None = None
    stream: bool = False


class CountTokensRequest(RequestBody):
    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: ThinkingConfig | None = None


# ---------------------------------------------------------------------------------------------------
# Request → chat


def _text(blocks: str | list[dict[str, Any]], where: str) -> str:
    """The text of a string or a list of text blocks; anything else is refused."""
    if isinstance(blocks, str):
        return blocks
    parts = []
    for i, block in enumerate(blocks):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise RequestError(f"{where}[{i}]: only text blocks are supported here, got {kind!r}",
                               param=f"{where}[{i}]")
        parts.append(block["text"])
    return "\n".join(parts)


def _user_messages(content: str | list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    out, texts = [], []
    for i, block in enumerate(content):
        kind = block.get("type")
        if kind == "tool_result":
            result = block.get("content", "")
            text = _text(result, f"{where}[{i}].content") if result is not None else ""
            if block.get("is_error"):
                text = f"Error: {text}"
            out.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text})
        elif kind == "text":
            texts.append(block.get("text", ""))
        else:
            raise RequestError(f"{where}[{i}]: content blocks of type {kind!r} are not supported (text and "
                               "tool_result only)", param=f"{where}[{i}]")
    if texts:
        out.append({"role": "user", "content": "\n".join(texts)})
    return out


def _assistant_message(content: str | list[dict[str, Any]], where: str) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts, thoughts, calls = [], [], []
    for i, block in enumerate(content):
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text", ""))
        elif kind == "thinking":
            thoughts.append(block.get("thinking", ""))
        elif kind == "redacted_thinking":
            continue
        elif kind == "tool_use":
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"), "arguments": block.get("input") or {}}})
        else:
            raise RequestError(f"{where}[{i}]: assistant content blocks of type {kind!r} are not supported",
                               param=f"{where}[{i}]")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
    if thoughts:
        message["reasoning_content"] = "\n".join(thoughts)
    if calls:
        message["tool_calls"] = calls
    return message


def chat_messages(system: str | list[dict[str, Any]] | None, messages: list[AnthropicMessage]) -> list[dict]:
    out = []
    if system:
        out.append({"role": "system", "content": _text(system, "system")})
    for i, message in enumerate(messages):
        where = f"messages[{i}].content"
        if message.role == "user":
            out += _user_messages(message.content, where)
        else:
            out.append(_assistant_message(message.content, where))
    return out


def chat_tools(tools: list[AnthropicTool] | None) -> list[dict[str, Any]] | None:
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        if tool.type not in (None, "custom"):
            raise RequestError(f"tools[{i}]: server tools ({tool.type!r}) are not supported; declare custom tools "
                               "with name, description and input_schema", param=f"tools[{i}]")
        function = {"name": tool.name, "parameters": tool.input_schema}
        if tool.description is not None:
            function["description"] = tool.description
        out.append({"type": "function", "function": function})
    return out


def chat_tool_choice(choice: AnthropicToolChoice | None) -> tuple[Any, bool]:
    """(OpenAI-style tool_choice, parallel calls allowed)."""
    if choice is None:
        return None, True
    parallel = not choice.disable_parallel_tool_use
    if choice.type == "tool":
        if not choice.name:
            raise RequestError('tool_choice {"type": "tool"} needs a name', param="tool_choice.name")
        return {"type": "function", "function": {"name": choice.name}}, parallel
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type], parallel


def thinking_settings(thinking: ThinkingConfig | None, max_tokens: int | None) -> tuple[bool, int | None]:
    """(enable_thinking, thinking budget)."""
    if thinking is None or thinking.type == "disabled":
        return False, None
    if thinking.type != "enabled":
        return True, None
    budget = thinking.budget_tokens
    if budget is None:
        raise RequestError('thinking {"type": "enabled"} needs budget_tokens', param="thinking.budget_tokens")
    if max_tokens is not None and budget >= max_tokens:
        raise RequestError(f"thinking.budget_tokens ({budget}) must be less than max_tokens ({max_tokens})",
                           param="thinking.budget_tokens")
    return True, budget


EFFORT_BUDGETS = {"low": 1024, "medium": 4096}


def output_schema(request: MessagesRequest) -> dict[str, Any] | None:
    """The JSON schema of `output_config.format` / `output_format`, if any."""
    fmt = (request.output_config or {}).get("format") or request.output_format
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise RequestError('output_config.format must be {"type": "json_schema", "schema": {...}}',
                           param="output_config.format")
    return fmt["schema"]


def effort_budget(request: MessagesRequest) -> int | None:
    effort = (request.output_config or {}).get("effort")
    budget = EFFORT_BUDGETS.get(effort) if isinstance(effort, str) else None
    return None if budget is None else min(budget, request.max_tokens // 2)


# ---------------------------------------------------------------------------------------------------
# Response


def stop_reason(engine_reason: str | None, stop: int | str | None, called_tools: bool) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) of a finished answer."""
    if called_tools and engine_reason == "stop":
        return "tool_use", None
    if engine_reason == "length":
        return "max_tokens", None
    if engine_reason == "stop" and isinstance(stop, str):
        return "stop_sequence", stop
    return "end_turn", None


def tool_input(arguments: str) -> dict[str, Any]:
    value = json.loads(arguments or "{}")
    return value if isinstance(value, dict) else {"value": value}
