"""The chat protocol of GLM-4.5, shared by every front end (server, `LLM.chat`, `glm45 chat`, /tokenize).

- `render.py`: messages and tools → the prompt text, byte for byte the official template (`template.py`);
- `plan.py`: one chat request → its prompt and how its answer is decoded and parsed (template kwargs merged
  and validated, tools, tool choice);
- `turn.py`: parser events → the assistant message (reasoning, content, tool calls).
"""

from glm45.chat.plan import ChatPlan, ChatRequestError, merge_template_kwargs, plan_chat
from glm45.chat.render import normalize_messages, normalize_tools, render_chat
from glm45.chat.template import GLM45_CHAT_TEMPLATE
from glm45.chat.turn import AssistantTurn, assemble_turn

__all__ = [
    "GLM45_CHAT_TEMPLATE",
    "AssistantTurn",
    "ChatPlan",
    "ChatRequestError",
    "assemble_turn",
    "merge_template_kwargs",
    "normalize_messages",
    "normalize_tools",
    "plan_chat",
    "render_chat",
]
