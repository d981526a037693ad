"""The grammar engine behind constrained decoding: xgrammar, compiled once per tokenizer, grammars cached.

`GrammarBackend(tokenizer, vocab_size)` turns a request's `StructuredOutputsParams` into compiled grammars —
the answer's (JSON, and/or GLM-4.5 tool calls) and, for tool_choice "auto", the call's — and makes each
sequence its `SequenceConstraint`. A grammar that cannot be compiled raises `GrammarError` (a ValueError with
the engine's reason), which the server answers with a 400 before anything runs.

Why xgrammar and not llguidance (both are on PyPI and both give a token bitmask per step; measured with
`benchmarks/bench_grammar.py` on the 2-core CPU, one thread, a nested JSON schema, per generated token):

    vocabulary          xgrammar: mask + accept       llguidance: mask + accept      compile (xgrammar)
    3,072 (bundled)     2–3 µs + 5–9 µs               7–17 µs + 6–7 µs               ~1 ms
    151,552 (GLM-4.5)   4–5 µs + 8–12 µs              20–29 µs + 9–10 µs             ~12 ms

xgrammar precomputes, at compile time, which tokens each grammar position accepts (its adaptive token-mask
cache), so the mask of a step is mostly a copy; llguidance computes it lazily at every step with no compile
step. Both cost far less than a decode step here (about 1 ms on the bundled model), so the choice is decided
by what matters per token — xgrammar is 3–6× cheaper — and by fit: xgrammar's structural tags already speak
GLM's tool-call format (`JSONSchemaFormat(style="glm_xml")`: `<arg_key>K</arg_key><arg_value>V</arg_value>`
with raw-text strings and JSON for the other types, typed by the schema), free text that dispatches on a
trigger, and `fork()` for speculative drafts. Its compile time (and its cache) is paid once per distinct
schema, in the server's request checks rather than in the engine's step. Applying a mask to the logits is ours
(`masks.py`): xgrammar's own CPU path costs ~10 µs (3k) and ~470 µs (151k) per row, ours 5 µs and 65 µs.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import re
import threading
import weakref
from collections.abc import Sequence
from typing import Any

from glm45.grammar import closing, masks, tool_calls
from glm45.grammar.constraint import SequenceConstraint
from glm45.grammar.spec import StructuredOutputsParams, ToolCallConstraint, ToolCallMode, tool_name

logger = logging.getLogger(__name__)

CACHE_BYTES = 256 << 20  # compiled grammars kept (xgrammar's LRU cache)
ROUTES_KEPT = 4096       # answer-route lengths kept, by structural tag


class GrammarError(ValueError):
    """A schema or tool definition the grammar engine cannot compile; the message says why."""


def _xgrammar():
    try:
        import xgrammar
    except ImportError as e:  # pragma: no cover - the server extra installs it
        raise GrammarError("constrained decoding needs the xgrammar package: pip install 'glm45[server]'") from e
    return xgrammar


class GrammarBackend:
    """xgrammar's view of one tokenizer (every token's bytes, the stop tokens) and a grammar compiler with its
    cache. Thread-safe: the server compiles in worker threads to check requests, the engine thread again (a cache
    hit) to decode."""

    def __init__(self, tokenizer: Any, vocab_size: int):
        xgr = _xgrammar()
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = list(tokenizer.eos_token_ids)
        vocab = tokenizer.vocab_bytes
        self.info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=vocab_size,
                                      stop_token_ids=self.stop_token_ids)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_limit_bytes=CACHE_BYTES)
        self.token_bytes = vocab + [b""] * (vocab_size - len(vocab))
        self.think_start = tokenizer.token_to_id("<think>")
        self.think_end = tokenizer.token_to_id("</think>")
        self.tool_call_start = tokenizer.token_to_id("<tool_call>")
        self.assistant = tokenizer.token_to_id("<|assistant|>")
        # Rows of fixed bitmasks: whitespace-only tokens (what a model writes before it opens its thought,
        # "\n<think>") or `<think>`; `<think>` alone; `</think>` alone (a spent thinking budget).
        blanks = [i for i, b in enumerate(self.token_bytes) if b and not b.strip()]
        thinks = [self.think_start] if self.think_start is not None else []
        self.blank_or_think_row = masks.from_ids(blanks + thinks, vocab_size)
        self.think_start_row = masks.from_ids(thinks, vocab_size)
        self.only_think_end = masks.from_ids([self.think_end] if self.think_end is not None else [], vocab_size)
        self._name_tokens: dict[str, list[int]] = {}
        # The structural tag of each compiled grammar handed out (while it lives), and by tag the length of the
        # shortest whole answer (a closing route through the whole grammar) once looked up.
        self._lock = threading.RLock()  # reentrant: a finalizer may run (garbage collection) while it is held
        self._texts: dict[int, str] = {}
        self._answer_routes: collections.OrderedDict[str, int | None] = collections.OrderedDict()

    @functools.cached_property
    def _closing_orders(self):
        return [closing.closing_order(self.token_bytes, self.stop_token_ids, preferred, longest)
                for preferred in (closing.JSON_FIRST, closing.PREFERRED) for longest in (True, False)]

    def shortest_route(self, matcher, num_starts: int | None = None) -> list[int] | None:
        """The tokens of a short way from `matcher`'s state to the end of its grammar (`closing.py`), starting from
        each closing order or from the first `num_starts`."""
        return closing.shortest_route(matcher, self._closing_orders, set(self.stop_token_ids), self.vocab_size,
                                      num_starts=num_starts)

    def one_hot(self, token_id: int):
        """A bitmask row allowing only `token_id`."""
        return masks.from_ids([token_id], self.vocab_size)

    # ------------------------------------------------------------------ a sequence's constraint
    def constraint(self, spec: StructuredOutputsParams | None, prompt_ids: Sequence[int],
                   thinking_budget: int | None = None, max_tokens: int | None = None) -> SequenceConstraint | None:
        """The constraint of one sequence, or None when nothing constrains it. Whether the model may think first is
        the spec's `reasoning`, else read from the prompt: GLM-4.5's generation prompt with thinking on ends with
        `<|assistant|>` (thinking off, and a prefilled call, end after `</think>`)."""
        reasoning = spec.reasoning if spec is not None and spec.reasoning is not None else \
            bool(prompt_ids) and prompt_ids[-1] == self.assistant
        answer = self.compile_answer(spec) if spec is not None else None
        calls = spec.tool_calls if spec is not None else None
        call = self.compile_call(calls) if answer is None and calls is not None and calls.triggered else None
        budget = thinking_budget if reasoning else None
        if budget is not None and (self.think_start is None or self.think_end is None):
            raise GrammarError("a thinking budget needs a tokenizer with <think> and </think> tokens")
        if answer is None and call is None and budget is None:
            return None
        names = tuple(tool_name(t) for t in calls.tools) if calls is not None and calls.mode != ToolCallMode.NAMED \
            else ()
        opened = bool(prompt_ids) and prompt_ids[-1] == self.tool_call_start
        return SequenceConstraint(self, answer, call, reasoning, budget, max_tokens, names, opened)

    def name_tokens(self, name: str) -> list[int]:
        """The tokens of a tool's name as a call writes it, followed by the newline that ends it."""
        tokens = self._name_tokens.get(name)
        if tokens is None:
            tokens = self._name_tokens[name] = self.tokenizer.encode(name + "\n")
        return tokens

    # ------------------------------------------------------------------ compiling
    def compile_answer(self, spec: StructuredOutputsParams):
        """The grammar of the whole answer (after any thought), or None when only tool calls are triggered."""
        calls = spec.tool_calls
        if calls is not None and not calls.triggered:
            return self._compile(tool_calls.forced_calls_format(calls), "tools")
        if not spec.has_answer_format:
            return None
        answer = self._answer_format(spec)
        if calls is not None:  # JSON, or calls to the declared tools (an agent's last answer, or one more call)
            answer = tool_calls.or_format([answer, tool_calls.opened_calls_format(calls)])
        if spec.reasoning is False:  # thinking off: the answer is the whole output, from its first character
            return self._compile(answer, "response_format")
        # after `</think>` the template puts a newline, which the reasoning parser drops from the content
        return self._compile(tool_calls.sequence_format([tool_calls.regex_format("\n?"), answer]), "response_format")

    def compile_call(self, calls: ToolCallConstraint):
        """The grammar of one call after the model opened it with `<tool_call>` (tool_choice "auto")."""
        return self._compile(tool_calls.triggered_call_format(calls), "tools")

    def check(self, spec: StructuredOutputsParams) -> None:
        """Compile every grammar `spec` needs (cached for the engine); `GrammarError` if one cannot be."""
        self.compile_answer(spec)
        if spec.tool_calls is not None and spec.tool_calls.triggered:
            self.compile_call(spec.tool_calls)

    @staticmethod
    def _answer_format(spec: StructuredOutputsParams):
        st = _xgrammar().structural_tag
        if spec.regex is not None:
            return st.RegexFormat(pattern=spec.regex)
        if spec.choice is not None:
            return tool_calls.or_format([st.ConstStringFormat(value=c) for c in spec.choice])
        if spec.grammar is not None:
            return st.GrammarFormat(grammar=spec.grammar)
        schema = {"type": "object"} if spec.json_object else spec.json
        # At most one whitespace character between JSON tokens: compact or `{"a": 1}` style, never a run of
        # newlines that a small model can fall into and not leave. (No `excludes` of GLM's tags in strings: xgrammar
        # then drops minLength/maxLength; a tag inside a JSON string only matters when tools are parsed too.)
        return st.JSONSchemaFormat(json_schema=tool_calls.lengths_as_patterns(schema, tool_calls.JSON_CHAR),
                                   max_whitespace_cnt=1)

    def _compile(self, fmt: Any, param: str):
        structural_tag = json.dumps({"type": "structural_tag", "format": fmt.model_dump(mode="json")},
                                    ensure_ascii=False)
        try:
            grammar = self.compiler.compile_structural_tag(structural_tag)  # xgrammar caches by this text
        except Exception as e:  # xgrammar raises RuntimeError/ValueError subclasses with the reason
            raise GrammarError(f"{param}: the grammar engine cannot compile this schema: {_reason(e)}") from None
        with self._lock:
            self._texts[id(grammar)] = structural_tag
        weakref.finalize(grammar, self._forget, id(grammar))  # an id names one grammar only while it lives
        return grammar

    def _forget(self, key: int) -> None:
        with self._lock:
            self._texts.pop(key, None)

    def answer_route(self, grammar) -> int | None:
        """Tokens of the shortest route through a whole answer of `grammar` (None: none found), looked up once per
        structural tag (of the last `ROUTES_KEPT`)."""
        with self._lock:
            text = self._texts.get(id(grammar))
            if text is not None and text in self._answer_routes:
                self._answer_routes.move_to_end(text)
                return self._answer_routes[text]
        route = self.shortest_route(_xgrammar().GrammarMatcher(grammar))
        length = None if route is None else len(route)
        if text is not None:
            with self._lock:
                self._answer_routes[text] = length
                while len(self._answer_routes) > ROUTES_KEPT:
                    self._answer_routes.popitem(last=False)
        return length


def _reason(error: Exception) -> str:
    """xgrammar's message without its C++ source location ("[12:00:00] /project/cpp/x.cc:12: reason")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[-1] if lines else type(error).__name__
    return re.sub(r"^\[[\d:]+\]\s*\S+:\d+:\s*", "", text)
