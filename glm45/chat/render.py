"""Chat messages and tools → the GLM-4.5 prompt text.

The model only behaves well on prompts laid out exactly as in training, so `render_chat` reproduces the
official chat template (`glm45.chat.template`) byte for byte, in plain Python: no jinja on the hot path,
and a readable statement of the protocol. `render_chat(..., chat_template=text)` renders with a
checkpoint's own jinja template instead, in the same sandboxed environment transformers uses.

Messages are validated first (a `ValueError` names the message and what is wrong) and normalised into the
form the template expects, which both renderers then share:
- tool call `arguments` given as a JSON string (OpenAI) are parsed into a dict;
- an assistant message with `content: None` (OpenAI, when it only calls tools) renders as empty, as vLLM
  does (the raw template would write the word "None");
- a tool message whose content is a list of OpenAI text parts is joined into one string (the raw template
  would write the parts' Python repr); a list of strings or `{"output": str}` items keeps the template's
  own "one `<tool_response>` per item" layout.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

from glm45.tool_definitions import normalize_tools

PROMPT_PREFIX = "[gMASK]<sop>"
ROLES = ("system", "user", "assistant", "tool")

_TOOLS_HEADER = (
    "<|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
_TOOLS_FOOTER = (
    "</tools>\n\nFor each function call, output the function name and arguments within the following "
    "XML format:\n<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n"
    "<arg_value>{arg-value-1}</arg_value>\n<arg_key>{arg-key-2}</arg_key>\n"
    "<arg_value>{arg-value-2}</arg_value>\n...\n</tool_call>"
)


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    enable_thinking: bool = True,
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
) -> str:
    """Render a conversation into the GLM-4.5 prompt text.

    `messages` are OpenAI-style dicts (roles system/user/assistant/tool); `tools` are OpenAI tool
    definitions (`{"type": "function", "function": {...}}`), rendered as given. With
    `enable_thinking=False` every user turn gets `/nothink` and the generation prompt closes the thought
    block. `chat_template`, when given, is a jinja template (e.g. a checkpoint's own) used instead of the
    built-in renderer.
    """
    msgs = normalize_messages(messages)
    tool_list = normalize_tools(tools)
    if chat_template is not None:
        return _render_jinja(chat_template, msgs, tool_list, enable_thinking, add_generation_prompt)

    parts = [PROMPT_PREFIX]
    if tool_list:
        parts.append(_TOOLS_HEADER)
        parts.extend(_tojson(tool) + "\n" for tool in tool_list)
        parts.append(_TOOLS_FOOTER)
    last_user_index = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=-1)
    for i, m in enumerate(msgs):
        role = m["role"]
        if role == "system":
            parts.append("<|system|>\n" + _visible_text(m["content"]))
        elif role == "user":
            text = _visible_text(m["content"])
            parts.append("<|user|>\n" + text)
            if not enable_thinking and not text.endswith("/nothink"):
                parts.append("/nothink")
        elif role == "assistant":
            parts.append(_render_assistant(m, keep_reasoning=i > last_user_index))
        else:
            parts.append(_render_tool(m, follows_tool=i > 0 and msgs[i - 1]["role"] == "tool"))
    if add_generation_prompt:
        parts.append("<|assistant|>" if enable_thinking else "<|assistant|>\n<think></think>")
    return "".join(parts)


def _render_assistant(m: Mapping[str, Any], keep_reasoning: bool) -> str:
    content = _visible_text(m.get("content", ""))
    reasoning = m.get("reasoning_content")
    if not isinstance(reasoning, str):
        # Reasoning embedded in the content as <think>…</think>; the template splits it off like this.
        reasoning = ""
        if "</think>" in content:
            reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
            content = content.split("</think>")[-1].lstrip("\n")
    out = ["<|assistant|>"]
    # Past reasoning is shown to the model only for turns after the last user message.
    if keep_reasoning and reasoning:
        out.append("\n<think>" + reasoning.strip() + "</think>")
    else:
        out.append("\n<think></think>")
    if content.strip():
        out.append("\n" + content.strip())
    for call in m.get("tool_calls") or ():
        fn = call.get("function") or call
        out.append("\n<tool_call>" + fn["name"] + "\n")
        for key, value in fn["arguments"].items():
            text = value if isinstance(value, str) else _tojson(value)
            out.append(f"<arg_key>{key}</arg_key>\n<arg_value>{text}</arg_value>\n")
        out.append("</tool_call>")
    return "".join(out)


def _render_tool(m: Mapping[str, Any], follows_tool: bool) -> str:
    content = m["content"]
    if isinstance(content, str):
        # Consecutive tool results share one <|observation|>.
        head = "" if follows_tool else "<|observation|>"
        return head + "\n<tool_response>\n" + content + "\n</tool_response>"
    # A list of results: the template always opens its own <|observation|> for these.
    out = ["<|observation|>"]
    for item in content:
        text = item["output"] if isinstance(item, Mapping) else item
        out.append("\n<tool_response>\n" + text + "\n</tool_response>")
    return "".join(out)


def _visible_text(content: str | list) -> str:
    if isinstance(content, str):
        return content
    return "".join(item if isinstance(item, str) else item["text"] for item in content)


def _tojson(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------------
# Validation and normalisation


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validate `messages` and return copies in the form the GLM-4.5 template expects.

    Raises `ValueError` naming the message index and what is wrong.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of message dicts, got {type(messages).__name__}")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {message!r}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}] has role {role!r}; allowed roles are {', '.join(ROLES)}")
        m = dict(message)
        if role in ("system", "user"):
            m["content"] = _check_content(m, i, role)
        elif role == "assistant":
            _normalize_assistant(m, i)
        else:
            _normalize_tool(m, i, out)
        out.append(m)
    return out


def _check_content(m: Mapping[str, Any], i: int, role: str) -> str | list:
    if "content" not in m or m["content"] is None:
        raise ValueError(f"messages[{i}] ({role}) has no content; content must be a string or text parts")
    content = m["content"]
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(
            f"messages[{i}] ({role}) content is a {type(content).__name__}; "
            "allowed: a string or a list of {'type': 'text', 'text': ...} parts"
        )
    for j, part in enumerate(content):
        if isinstance(part, str):
            continue
        if not isinstance(part, Mapping) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise ValueError(
                f"messages[{i}] ({role}) content part {j} has type {kind!r}; only text parts "
                "({'type': 'text', 'text': ...}) or strings are supported"
            )
        if not isinstance(part.get("text"), str):
            raise ValueError(f"messages[{i}] ({role}) content part {j} is a text part without a string 'text'")
    return list(content)


def _normalize_assistant(m: dict[str, Any], i: int) -> None:
    calls = m.get("tool_calls")
    if calls is not None and not isinstance(calls, list):
        raise ValueError(f"messages[{i}] (assistant) tool_calls must be a list, got {type(calls).__name__}")
    if m.get("content") is None:
        if not calls and not isinstance(m.get("reasoning_content"), str):
            raise ValueError(f"messages[{i}] (assistant) has no content and no tool_calls")
        m["content"] = ""
    else:
        m["content"] = _check_content(m, i, "assistant")
    reasoning = m.get("reasoning_content")
    if reasoning is not None and not isinstance(reasoning, str):
        raise ValueError(
            f"messages[{i}] (assistant) reasoning_content is a {type(reasoning).__name__}; it must be a string"
        )
    if calls:
        m["tool_calls"] = [_normalize_tool_call(call, i, j) for j, call in enumerate(calls)]


def _normalize_tool_call(call: Any, i: int, j: int) -> dict[str, Any]:
    where = f"messages[{i}] (assistant) tool_calls[{j}]"
    if not isinstance(call, Mapping):
        raise ValueError(f"{where} must be a dict, got {call!r}")
    call = dict(call)
    wrapped = "function" in call
    fn = call["function"] if wrapped else call
    if not isinstance(fn, Mapping):
        raise ValueError(f"{where} 'function' must be a dict with 'name' and 'arguments'")
    fn = dict(fn)
    if not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ValueError(f"{where} has no function name; expected a non-empty string 'name'")
    arguments = fn.get("arguments")
    if arguments is None or arguments == "":
        arguments = {}
    elif isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} arguments are not valid JSON ({e}); expected a JSON object") from None
    if not isinstance(arguments, Mapping):
        raise ValueError(
            f"{where} arguments must be a JSON object (dict or JSON string of one), got {arguments!r}"
        )
    for key in arguments:
        if not isinstance(key, str):
            raise ValueError(f"{where} argument names must be strings, got {key!r}")
    fn["arguments"] = dict(arguments)
    if wrapped:
        call["function"] = fn
        return call
    return fn


def _normalize_tool(m: dict[str, Any], i: int, previous: list[dict[str, Any]]) -> None:
    k = len(previous) - 1
    while k >= 0 and previous[k]["role"] == "tool":
        k -= 1
    if k < 0 or previous[k]["role"] != "assistant" or not previous[k].get("tool_calls"):
        raise ValueError(
            f"messages[{i}] is a tool result with no preceding assistant message that has tool_calls"
        )
    content = m.get("content")
    if isinstance(content, str):
        return
    if not isinstance(content, list) or not content:
        raise ValueError(
            f"messages[{i}] (tool) content must be a string or a non-empty list, got {content!r}"
        )
    if all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
        m["content"] = _visible_text(_check_content(m, i, "tool"))
        return
    for j, item in enumerate(content):
        if isinstance(item, str) or (isinstance(item, Mapping) and isinstance(item.get("output"), str)):
            continue
        raise ValueError(
            f"messages[{i}] (tool) content item {j} is {item!r}; allowed: all OpenAI text parts, "
            "or strings and {'output': str} items"
        )
    m["content"] = list(content)


# ---------------------------------------------------------------------------------------------------
# Rendering with a jinja template (a checkpoint's own), as transformers does


def _render_jinja(
    template: str,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    enable_thinking: bool,
    add_generation_prompt: bool,
) -> str:
    return _compile(template).render(
        messages=messages,
        tools=tools,
        enable_thinking=enable_thinking,
        add_generation_prompt=add_generation_prompt,
    )


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise ValueError(f"chat template error: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template does not parse: {e}") from None
