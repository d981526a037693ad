"""`glm45 chat`: a conversation with a model in the terminal, streamed token by token.

The engine runs in-process (no server). Reasoning is streamed dimmed, or hidden with `--hide-thinking`;
`--no-thinking` turns it off. With `--tools FILE` (a JSON list of OpenAI tool definitions) the model may
call tools: each call is printed and its result is read from the terminal and sent back, which is the
whole tool loop a client runs. Commands: `/reset` starts over (keeping the system prompt), `/exit` ends.
Ctrl-C stops the answer being generated; Ctrl-D ends the chat.
"""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from glm45.chat import AssistantTurn, plan_chat
from glm45.cli_args import arg
from glm45.engine.engine import LLMEngine
from glm45.engine.sampling_params import SamplingParams
from glm45.parsers import ContentDelta, ReasoningDelta

DIM, BOLD, RESET = "\033[2m", "\033[1m", "\033[0m"
HELP = "commands: /reset (start over), /exit (quit); Ctrl-C stops an answer, Ctrl-D quits"


@dataclass
class ChatSettings:
    thinking: bool = arg(True, "let the model think before answering")
    hide_thinking: bool = arg(False, "think, but do not print the reasoning")
    system: str | None = arg(None, "a system prompt")
    temperature: float = arg(0.6, "sampling temperature")
    top_p: float = arg(0.95, "nucleus sampling mass")
    max_tokens: int = arg(2048, "longest answer in tokens")
    color: bool = arg(True, "ANSI styles (dim reasoning, bold tool calls)")


class TerminalChat:
    def __init__(self, engine: LLMEngine, settings: ChatSettings, tools: list[dict] | None = None,
                 out: TextIO = sys.stdout):
        if engine.tokenizer is None:
            raise ValueError("chat needs a tokenizer, and this model folder has none")
        self.engine = engine
        self.settings = settings
        self.tools = tools
        self.out = out
        self.messages: list[dict[str, Any]] = []
        self._ids = itertools.count()
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.settings.system}] if self.settings.system else []

    def _style(self, text: str, style: str) -> str:
        return f"{style}{text}{RESET}" if self.settings.color else text

    def _print(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def reply(self) -> dict[str, Any]:
        """Generate, print and record the assistant's next turn; returns the assistant message."""
        s = self.settings
        plan = plan_chat(self.messages, self.tools, default_template_kwargs={"enable_thinking": s.thinking})
        max_tokens = min(s.max_tokens, self.engine.max_model_len - len(self.engine.tokenizer.encode(plan.prompt)))
        if max_tokens < 1:
            raise ValueError(f"the conversation fills the context ({self.engine.max_model_len} tokens); /reset")
        request_id = f"chat-{next(self._ids)}"
        self.engine.add_request(request_id, plan.prompt, SamplingParams(temperature=s.temperature, top_p=s.top_p,
                                                                        max_tokens=max_tokens))
        turn = AssistantTurn.for_plan(plan)
        state = None  # what was printed last: "reasoning" | "content"

        def show(events) -> None:
            nonlocal state
            for event in events:
                if isinstance(event, ReasoningDelta) and not s.hide_thinking:
                    self._print(self._style(event.text, DIM))
                    state = "reasoning"
                elif isinstance(event, ContentDelta):
                    if state == "reasoning":
                        self._print("\n\n")
                    self._print(event.text)
                    state = "content"

        sent, finished = 0, False
        try:
            while not finished:
                for output in self.engine.step():
                    if output.request_id != request_id:
                        continue
                    completion = output.outputs[0]
                    show(turn.feed(completion.text[sent:]))
                    sent = len(completion.text)
                    finished = output.finished
            show(turn.finish())
        except KeyboardInterrupt:
            self.engine.abort_request(request_id)
            self._print(self._style(" [stopped]", DIM))
        self._print("\n")
        for call in turn.tool_calls:
            self._print(self._style(f"→ tool call: {call.name}({call.arguments or '{}'})", BOLD) + "\n")
        message = turn.message()
        self.messages.append(message)
        return message

    def run(self, read: Callable[[str], str] = input) -> None:
        self._print(self._style(HELP, DIM) + "\n")
        while True:
            try:
                line = read("> ")
            except (EOFError, KeyboardInterrupt):
                self._print("\n")
                return
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                return
            if text == "/reset":
                self.reset()
                self._print(self._style("(conversation reset)", DIM) + "\n")
                continue
            if text.startswith("/") and text.split()[0] in ("/help", "/?"):
                self._print(HELP + "\n")
                continue
            start = len(self.messages)
            self.messages.append({"role": "user", "content": line})
            try:
                message = self.reply()
                # The tool loop: the user plays the tools, the model goes on until it answers.
                while message.get("tool_calls"):
                    for call in message["tool_calls"]:
                        result = read(f"result of {call['function']['name']}> ")
                        self.messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
                    message = self.reply()
            except ValueError as e:
                del self.messages[start:]
                self._print(f"error: {e}\n")
            except (EOFError, KeyboardInterrupt):
                self._print("\n")
                return


def load_tools(path: str | None) -> list[dict] | None:
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        try:
            tools = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(tools, list):
        raise ValueError(f"{path} must hold a JSON list of tool definitions")
    return tools
