"""Parsers for GLM-4.5 output: reasoning (`<think>…</think>`) and tool calls, streaming-first.

One-shot: `parse_reasoning(text) -> (reasoning, content)`, `parse_tool_calls(text, tools) ->
(content, calls)`, `parse_chat_output(text, tools) -> ChatOutput`. Streaming: `ReasoningParser`,
`ToolCallParser`, `ChatOutputParser`, each with `feed(delta) -> events` and `finish() -> events`; the
events (`ReasoningDelta`, `ContentDelta`, `ToolCallDelta`) map one to one onto OpenAI stream deltas.
`convert_value(raw, schema)` (in `glm45.parsers.values`) types one argument value from its JSON schema.
"""

from glm45.parsers.chat_output import ChatOutput, ChatOutputParser, parse_chat_output
from glm45.parsers.events import ContentDelta, Event, ReasoningDelta, ToolCallDelta
from glm45.parsers.reasoning import ReasoningParser, parse_reasoning
from glm45.parsers.tool_calls import ToolCallParser, convert_value, parse_tool_calls

__all__ = [
    "ChatOutput",
    "ChatOutputParser",
    "ContentDelta",
    "Event",
    "ReasoningDelta",
    "ReasoningParser",
    "ToolCallDelta",
    "ToolCallParser",
    "convert_value",
    "parse_chat_output",
    "parse_reasoning",
    "parse_tool_calls",
]
