"""Constrained decoding: the tokens a sequence may sample next, from a grammar its request asks for.

- `spec.py`: what a request asks (`StructuredOutputsParams`: a JSON schema or object, GLM-4.5 tool calls);
- `backend.py`: the grammar engine (xgrammar; why, with measurements, in its docstring), compiled grammars;
- `tool_calls.py`: GLM-4.5's `<tool_call>` format as grammars, arguments typed by each tool's schema;
- `constraint.py`: one sequence's state — thinking stays free, the grammar starts after `</think>`, a thinking
  budget, calls triggered by `<tool_call>` — and its next-token restriction;
- `masks.py`: token bitmasks applied to logits.
The engine keeps one `SequenceConstraint` per sequence and masks its logits before sampling, verifying MTP
drafts and drafting (`glm45/engine/logits.py`).
"""

from glm45.grammar import masks
from glm45.grammar.backend import GrammarBackend, GrammarError
from glm45.grammar.constraint import Restriction, SequenceConstraint
from glm45.grammar.spec import StructuredOutputsParams, ToolCallConstraint, ToolCallMode, tool_call_constraint

__all__ = [
    "masks",
    "GrammarBackend",
    "GrammarError",
    "Restriction",
    "SequenceConstraint",
    "StructuredOutputsParams",
    "ToolCallConstraint",
    "ToolCallMode",
    "tool_call_constraint",
]
