"""Constrained decoding's pieces on the bundled model's tokenizer (`glm45.grammar`): what each phase of an output
allows, GLM-4.5's tool-call grammars, the closing route, bitmasks, and what cannot be compiled."""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest
import torch
import xgrammar

from glm45.config import bundled_model_path
from glm45.engine.sampling_params import SamplingParams
from glm45.grammar import (
    GrammarBackend,
    GrammarError,
    StructuredOutputsParams,
    ToolCallConstraint,
    ToolCallMode,
    masks,
    tool_call_constraint,
)
from glm45.grammar.constraint import ROUTE_HORIZON, Phase
from glm45.tokenizer import Tokenizer

SCHEMA = {"type": "object", "required": ["a", "b"],
          "properties": {"a": {"type": "string"}, "b": {"type": "array", "items": {"type": "integer"}}}}
TOOLS = ({"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "get", "parameters": {"type": "object", "properties": {}}}})


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_pretrained(bundled_model_path())


@pytest.fixture(scope="module")
def backend(tokenizer):
    return GrammarBackend(tokenizer, 3072)


def walk(backend, tokenizer, spec, text, *, budget=None, prompt=(1,), max_tokens=None):
    """Feed `text`'s tokens through a fresh constraint, checking each is allowed; (constraint, first refused token
    text or None)."""
    constraint = backend.constraint(spec, list(prompt), budget, max_tokens)
    bitmask = masks.allocate(1, 3072)
    for token in tokenizer.encode(text):
        restriction = constraint.restrict(bitmask, 0)
        allowed = True
        if restriction is not None and restriction.masked:
            allowed = bool(masks.allowed(bitmask, 3072)[0, token])
        elif restriction is not None:
            allowed = token not in restriction.banned
        if not allowed:
            return constraint, tokenizer.decode([token], skip_special_tokens=False)
        assert constraint.accept(token)
    return constraint, None


def test_json_answer_after_a_free_thought(backend, tokenizer):
    spec = StructuredOutputsParams(json=SCHEMA, reasoning=True)
    c, refused = walk(backend, tokenizer, spec, '\n<think>any text { here</think>\n{"a": "x", "b": [1, 2]}<|user|>')
    assert refused is None and c.finished
    c, refused = walk(backend, tokenizer, spec, '\n{"a": "", "b": []}<|user|>')  # the thought may be skipped
    assert refused is None and c.finished
    assert walk(backend, tokenizer, spec, "\n<think>hm</think>\nSure")[1] == "S"
    assert walk(backend, tokenizer, spec, "\n<think>hm<|user|>")[1] == "<|user|>"  # the thought cannot end the turn
    assert walk(backend, tokenizer, spec, "\n<think>hm<tool_call>")[1] == "<tool_call>"
    off = StructuredOutputsParams(json=SCHEMA, reasoning=False)  # thinking off: the grammar starts at once
    assert walk(backend, tokenizer, off, '{"a": "x", "b": [3]}<|user|>')[0].finished
    assert walk(backend, tokenizer, off, "\n{")[1] == "\n"  # the answer is the whole output
    assert walk(backend, tokenizer, off, "<think>")[1] == "<think>"


def test_reasoning_is_read_from_the_prompt(backend, tokenizer):
    spec = StructuredOutputsParams(json=SCHEMA)
    assistant = tokenizer.special_token_id("<|assistant|>")
    assert backend.constraint(spec, [5, assistant]).phase == Phase.OPEN
    assert backend.constraint(spec, [5, tokenizer.special_token_id("</think>")]).phase == Phase.ANSWER


def test_forced_and_triggered_tool_calls(backend, tokenizer):
    required = StructuredOutputsParams(tool_calls=ToolCallConstraint(TOOLS, ToolCallMode.REQUIRED), reasoning=False)
    call = "get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris </arg_value>\n<arg_key>days</arg_key>\n" \
           "<arg_value>3</arg_value>\n</tool_call>"
    assert walk(backend, tokenizer, required, call + "<|observation|>")[0].finished
    assert walk(backend, tokenizer, required, call + "\n<tool_call>get\n</tool_call><|observation|>")[0].finished
    assert walk(backend, tokenizer, required, "get_weather\n<arg_key>days</arg_key>")[1] is not None  # city first
    assert walk(backend, tokenizer, required, "get_weathe\n")[1] is not None  # only declared names
    assert walk(backend, tokenizer, required, "get_weather\n<arg_key>city</arg_key>\n<arg_value>x</arg_value>\n"
                "<arg_key>days</arg_key>\n<arg_value>soon")[1] is not None  # an integer
    named = StructuredOutputsParams(tool_calls=ToolCallConstraint(TOOLS, ToolCallMode.NAMED, "get_weather", False),
                                    reasoning=False)
    assert walk(backend, tokenizer, named, "<arg_key>city</arg_key>\n<arg_value>P</arg_value>\n</tool_call>"
                "<|observation|>")[0].finished
    assert walk(backend, tokenizer, named, "<arg_key>city</arg_key>\n<arg_value>P</arg_value>\n</tool_call>\n")[1]
    auto = StructuredOutputsParams(tool_calls=ToolCallConstraint(TOOLS, ToolCallMode.AUTO_NAME), reasoning=True)
    text = "\n<think>hm</think>\nLet me look.<tool_call>get\n</tool_call>Then: <tool_call>get_weather<arg_key>x"
    c, refused = walk(backend, tokenizer, auto, text + "</arg_key></tool_call> done")
    assert refused is None and c.matcher is None  # free text again after each call
    assert walk(backend, tokenizer, auto, "\n<think>hm</think>\n<tool_call>get_wether")[1] is not None
    full = StructuredOutputsParams(tool_calls=ToolCallConstraint(TOOLS, ToolCallMode.AUTO_FULL), reasoning=False)
    assert walk(backend, tokenizer, full, "ok <tool_call>get_weather\n<arg_key>town")[1] is not None


def test_name_choices_where_a_call_name_starts(backend, tokenizer):
    names = [tokenizer.encode("get_weather\n"), tokenizer.encode("get\n")]
    auto = StructuredOutputsParams(tool_calls=ToolCallConstraint(TOOLS, ToolCallMode.AUTO_NAME), reasoning=True)
    c = backend.constraint(auto, [1])
    for token in tokenizer.encode("\n<think>hm</think>\nLook"):
        c.accept(token)
        assert c.name_choices() is None
    c.accept(backend.tool_call_start)
    assert c.name_choices() == names  # each allowed here, as its tokens and the newline that ends it
    c.accept(names[0][0])
    assert c.name_choices() is None  # not inside a name
    for token in tokenizer.encode("_weather\n</tool_call> and <tool_call>"):
        c.accept(token)
    assert c.name_choices() == names  # the next call's name
    short = backend.constraint(auto, [1], max_tokens=8)
    for token in tokenizer.encode("\n<think>a</think>\n<tool_call>"):
        short.accept(token)
    assert short.name_choices() is None  # "get_weather\n" would not fit in the tokens left
    required = StructuredOutputsParams(tool_calls=ToolCallConstraint(TOOLS, ToolCallMode.REQUIRED), reasoning=False)
    assert backend.constraint(required, [1, backend.tool_call_start]).name_choices() == names
    assert backend.constraint(required, [1, 2]).name_choices() is None  # nothing says a name starts
    named = StructuredOutputsParams(tool_calls=ToolCallConstraint(TOOLS, ToolCallMode.NAMED, "get", False),
                                    reasoning=False)
    assert backend.constraint(named, [1, backend.tool_call_start]).name_choices() is None
    one = StructuredOutputsParams(tool_calls=ToolCallConstraint(TOOLS[:1], ToolCallMode.REQUIRED), reasoning=False)
    assert backend.constraint(one, [1, backend.tool_call_start]).name_choices() is None  # no choice to make


def test_thinking_budget_forces_the_end_of_the_thought(backend, tokenizer):
    assistant = tokenizer.special_token_id("<|assistant|>")
    c, refused = walk(backend, tokenizer, None, "\n<think>a b c d e f</think>", budget=5, prompt=[assistant])
    assert refused == " " and c.num_tokens == 5  # "\n", "<think>", "a", " ", "b": then only </think>
    assert walk(backend, tokenizer, None, "\n<think>a b</think>\nok", budget=50, prompt=[assistant])[1] is None
    assert backend.constraint(None, [1], 5) is None  # no thought to come: nothing to constrain


def test_closing_route_completes_what_is_open(backend, tokenizer):
    grammar = backend.compile_answer(StructuredOutputsParams(json=SCHEMA))
    matcher = xgrammar.GrammarMatcher(grammar)
    assert matcher.accept_string('\n{"a": "hello wor')
    route = backend.shortest_route(matcher)
    text = tokenizer.decode(route[:-1], skip_special_tokens=False)
    assert json.loads('{"a": "hello wor' + text) == {"a": "hello wor", "b": []}
    assert route[-1] in tokenizer.eos_token_ids
    calls = backend.compile_answer(StructuredOutputsParams(
        tool_calls=ToolCallConstraint(TOOLS, ToolCallMode.REQUIRED)))
    route = backend.shortest_route(xgrammar.GrammarMatcher(calls))
    assert tokenizer.decode(route[:-1], skip_special_tokens=False).endswith("</tool_call>")


@pytest.mark.parametrize("max_tokens", [24, 60, 200, 600])
def test_a_constrained_answer_closes_before_max_tokens(backend, tokenizer, monkeypatch, max_tokens):
    """A model that never closes its string: the answer still ends complete at max_tokens; no closing route is looked
    up while more tokens are left than the longest route could need."""
    spec = StructuredOutputsParams(json=SCHEMA, reasoning=True)
    c = backend.constraint(spec, [1], max_tokens=max_tokens)
    lookups = []
    route = backend.shortest_route
    monkeypatch.setattr(backend, "shortest_route", lambda *a, **k: lookups.append(c.num_tokens) or route(*a, **k))
    bitmask, text, ids = masks.allocate(1, 3072), [], []
    filler = tokenizer.encode("la")[0]
    for _ in range(max_tokens):
        restriction = c.restrict(bitmask, 0)
        allowed = masks.allowed(bitmask, 3072)[0] if restriction is not None and restriction.masked else None
        # the "model" wants to write "la" forever (inside the thought, then inside the string)
        wants = [tokenizer.special_token_id("<think>")] if c.phase == Phase.OPEN else []
        wants += [filler] if c.phase == Phase.THINK or not text or '"a": "' in "".join(text) else []
        token = next((t for t in wants if allowed is None or allowed[t]), None)
        if token is None:
            token = int(np.flatnonzero(allowed)[0])
        c.accept(token)
        ids.append(token)
        text.append(tokenizer.decode([token], skip_special_tokens=False))
        if c.finished:
            break
    assert c.finished and len(ids) <= max_tokens
    answer = tokenizer.decode(ids).split("</think>")[1]
    assert set(json.loads(answer)) == {"a", "b"}
    assert lookups and min(lookups) >= max_tokens - ROUTE_HORIZON


def test_the_answer_route_is_looked_up_once_per_schema(backend, monkeypatch):
    spec = StructuredOutputsParams(json={"type": "object", "properties": {"q": {"type": "integer"}},
                                         "required": ["q"]}, reasoning=False)
    walks = []
    route = backend.shortest_route
    monkeypatch.setattr(backend, "shortest_route", lambda *a, **k: walks.append(1) or route(*a, **k))
    first, again = backend.compile_answer(spec), backend.compile_answer(spec)  # two objects, one structural tag
    assert first is not again
    assert backend.answer_route(first) == backend.answer_route(again) is not None and len(walks) == 1
    key = id(first)
    del first
    gc.collect()
    assert key not in backend._texts  # forgotten with the grammar: its id may name another one later


def test_bitmask_apply_matches_the_bits():
    rng = np.random.default_rng(0)
    for vocab in (3072, 151552, 100):
        words = rng.integers(-2**31, 2**31 - 1, size=(2, masks.words(vocab)), dtype=np.int64).astype(np.int32)
        bitmask = torch.from_numpy(words)
        logits = torch.randn(2, vocab)
        masks.apply(logits, bitmask)
        expected = [[(int(words[r, i // 32]) >> (i % 32)) & 1 for i in range(vocab)] for r in range(2)]
        assert torch.equal(torch.isfinite(logits), torch.tensor(expected, dtype=torch.bool))
    row = masks.from_ids([3, 40], 64)
    assert masks.allowed(row[None], 64)[0].nonzero()[0].tolist() == [3, 40]


def test_what_cannot_be_compiled_says_why(backend):
    with pytest.raises(GrammarError, match="Lookbehind"):
        backend.check(StructuredOutputsParams(json={"type": "string", "pattern": "(?<=a)b"}))
    with pytest.raises(ValueError, match="one answer format"):
        StructuredOutputsParams(json=SCHEMA, regex="a+")
    with pytest.raises(ValueError, match="not among the tools"):
        ToolCallConstraint(TOOLS, ToolCallMode.NAMED, "nope")
    assert tool_call_constraint(list(TOOLS), "auto", True, "off") is None
    assert tool_call_constraint(list(TOOLS), "none", True, "name") is None
    assert tool_call_constraint(list(TOOLS), "auto", True, "full").mode == ToolCallMode.AUTO_FULL


def test_sampling_params_check_the_new_fields():
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={3: 101})
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={-1: 1})
    with pytest.raises(ValueError, match="thinking_budget"):
        SamplingParams(max_tokens=10, thinking_budget=10)
    assert SamplingParams(max_tokens=10, thinking_budget=9, logit_bias={3: -100}).thinking_budget == 9
