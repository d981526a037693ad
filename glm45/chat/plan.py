"""Planning one chat request: its prompt text, and how its answer is to be parsed.

Every front end (the server's chat endpoint and /tokenize, `LLM.chat`, the terminal chat) plans a chat here,
so they agree on what a request means:
- chat template kwargs are the server's defaults overridden key by key by the request's, and validated;
- `tool_choice`: "auto" (the default when tools are given: the tools are in the prompt and the model
  decides), "none" (the tools are left out of the prompt and the output is not parsed for calls), "required"
  or a named function (`{"type": "function", "function": {"name": ...}}`): the answer is *prefilled* — the
  prompt ends with an empty thought block and `<tool_call>` (or `<tool_call>NAME\\n`), exactly as a past turn
  that called a tool is rendered, so the model continues inside a call. Prefilling skips thinking.
  The plan's `tool_constraint` then has the rest of the call decoded by a grammar (`glm45.grammar`): a declared
  name, every argument typed by its schema, so every call parses and validates; with "auto", the server's
  `--tool-call-constraint` (name | full | off) says how much of a call the model opens by itself is constrained.
Mistakes raise `ChatRequestError` (a ValueError) naming the request field at fault.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from glm45.chat.render import render_chat
from glm45.grammar.spec import StructuredOutputsParams, ToolCallConstraint
from glm45.grammar.spec import tool_call_constraint as make_tool_constraint


class ChatRequestError(ValueError):
    """A chat request that cannot be planned; `param` names the field at fault."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class ChatPlan:
    """How one chat request runs: the prompt, and how its output is parsed."""

    prompt: str
    forced_prefix: str               # text the answer was prefilled with (tool_choice required/named)
    tools: list[dict] | None         # tools the output is parsed for; None: no tool-call parsing
    reasoning: bool                  # parse `<think>…</think>` into reasoning_content
    single_call: bool                # keep only the first call (parallel_tool_calls=false, or a named function)
    enable_thinking: bool
    tool_constraint: ToolCallConstraint | None = None  # how the calls are decoded (None: freely)

    @property
    def thinks(self) -> bool:
        """The model may think before it answers (thinking on, and the answer not prefilled)."""
        return self.enable_thinking and not self.forced_prefix

    def structured_outputs(self, **answer: Any) -> StructuredOutputsParams | None:
        """What constrains the answer: the tool calls, plus `answer` (a JSON schema or another answer format,
        `StructuredOutputsParams`'s fields); None when nothing does."""
        if self.tool_constraint is None and not any(v not in (None, False) for v in answer.values()):
            return None
        return StructuredOutputsParams(**answer, tool_calls=self.tool_constraint, reasoning=self.thinks)


def merge_template_kwargs(defaults: Mapping[str, Any] | None, given: Mapping[str, Any] | None) -> dict[str, Any]:
    """The request's chat template kwargs over the defaults, key by key; `enable_thinking` must be a bool."""
    kwargs = {**(defaults or {}), **(given or {})}
    enable_thinking = kwargs.setdefault("enable_thinking", True)
    if not isinstance(enable_thinking, bool):
        raise ChatRequestError(f"chat_template_kwargs.enable_thinking must be true or false, got {enable_thinking!r}",
                               param="chat_template_kwargs")
    return kwargs


def _tool_name(tool: Mapping[str, Any]) -> str:
    return (tool.get("function") or tool)["name"]


def _describe(choice: Any) -> str:
    return json.dumps(choice) if isinstance(choice, Mapping) else repr(choice)


def plan_chat(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: str | Mapping[str, Any] | None = None,
    *,
    template_kwargs: Mapping[str, Any] | None = None,
    default_template_kwargs: Mapping[str, Any] | None = None,
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
    parallel_tool_calls: bool = True,
    parse_reasoning: bool = True,
    parse_tool_calls: bool = True,
    auto_tool_choice: bool = True,
    tool_call_constraint: str = "name",
) -> ChatPlan:
    """Check the messages, tools and tool choice and render the prompt.

    `parse_reasoning` / `parse_tool_calls` are the server's `--reasoning-parser` / `--tool-call-parser`;
    `auto_tool_choice` its `--enable-auto-tool-choice`, `tool_call_constraint` its `--tool-call-constraint`."""
    kwargs = merge_template_kwargs(default_template_kwargs, template_kwargs)
    enable_thinking = kwargs["enable_thinking"]
    tools = [dict(t) for t in tools] if tools else None
    choice = tool_choice if tool_choice is not None else ("auto" if tools else "none")
    forced_name = None
    if isinstance(choice, Mapping):
        function = choice.get("function")
        if choice.get("type") != "function" or not isinstance(function, Mapping) or not function.get("name"):
            raise ChatRequestError(f"tool_choice {_describe(choice)} must be 'none', 'auto', 'required' or "
                                   '{"type": "function", "function": {"name": ...}}', param="tool_choice")
        forced_name = function["name"]
    elif choice not in ("none", "auto", "required"):
        raise ChatRequestError(f"tool_choice {choice!r} must be 'none', 'auto', 'required' or a named function",
                               param="tool_choice")
    if choice != "none" and not tools:
        raise ChatRequestError(f"tool_choice {_describe(choice)} needs `tools`, and the request has none",
                               param="tool_choice")
    if forced_name is not None and forced_name not in {_tool_name(t) for t in tools}:
        raise ChatRequestError(f"tool_choice names the function {forced_name!r}, which is not in `tools` "
                               f"({', '.join(_tool_name(t) for t in tools)})", param="tool_choice")
    if choice != "none" and not parse_tool_calls:
        raise ChatRequestError("tool calls need the server to run with --tool-call-parser glm45", param="tool_choice")
    if choice == "auto" and not auto_tool_choice:
        raise ChatRequestError('"auto" tool choice needs the server to run with --enable-auto-tool-choice',
                               param="tool_choice")
    try:
        prompt = render_chat(messages, tools=tools if choice != "none" else None, enable_thinking=enable_thinking,
                             add_generation_prompt=add_generation_prompt, chat_template=chat_template)
    except ValueError as e:
        raise ChatRequestError(str(e), param="messages") from None

    forced_prefix = ""
    if choice == "required" or forced_name is not None:
        forced_prefix = "<tool_call>" if forced_name is None else f"<tool_call>{forced_name}\n"
        # Continue the turn exactly as a past turn that called a tool is rendered.
        if prompt.endswith("</think>"):
            prompt += "\n" + forced_prefix
        elif prompt.endswith("<|assistant|>"):
            prompt += "\n<think></think>\n" + forced_prefix
        else:
            raise ChatRequestError(f"tool_choice {_describe(choice)} needs a prompt that ends with the assistant's "
                                   "turn (add_generation_prompt=true)", param="tool_choice")
    single_call = not parallel_tool_calls or forced_name is not None
    constraint = make_tool_constraint(tools, choice, not single_call, tool_call_constraint)
    return ChatPlan(prompt=prompt, forced_prefix=forced_prefix, tools=tools if choice != "none" else None,
                    reasoning=parse_reasoning and enable_thinking and not forced_prefix,
                    single_call=single_call, enable_thinking=enable_thinking, tool_constraint=constraint)
