"""Constrained decoding end to end on the bundled model: answers to randomly generated JSON schemas always parse
and validate (thinking on and off), forced tool calls always parse and validate, MTP and batching do not change
a constrained greedy answer, and the thinking budget closes the thought.

The schemas are drawn by hypothesis-jsonschema from a meta-schema of the JSON Schema that structured-output
clients send (objects of strings, numbers, integers, booleans, enums, arrays and nested objects, with bounds,
`required` and nesting), so every schema is valid and satisfiable. The bundled model has never seen JSON, which is
the hard case: it rambles inside strings, and only the grammar's closing route ends its answers in time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jsonschema
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis_jsonschema import from_schema

from glm45 import LLM, SamplingParams
from glm45.chat import plan_chat
from glm45.grammar import StructuredOutputsParams
from glm45.parsers import parse_reasoning, parse_tool_calls

NUM_SCHEMAS = int(os.environ.get("GLM45_STRUCTURED_SCHEMAS", "120"))  # × thinking on and off = 240 generations
SCHEMAS_FILE = Path(__file__).parent / "data" / "random_schemas.json"
NAME = {"type": "string", "pattern": "^[a-z][a-z_]{0,9}$"}
LEAF = {"anyOf": [
    {"type": "object", "properties": {"type": {"const": "string"}, "maxLength": {"type": "integer", "minimum": 1,
                                                                                   "maximum": 40}},
     "required": ["type"], "additionalProperties": False},
    {"type": "object", "properties": {"type": {"enum": ["integer", "number"]},
                                      "minimum": {"type": "integer", "minimum": -1000, "maximum": 0},
                                      "maximum": {"type": "integer", "minimum": 1, "maximum": 100000}},
     "required": ["type"], "additionalProperties": False},
    {"type": "object", "properties": {"type": {"const": "boolean"}}, "required": ["type"],
     "additionalProperties": False},
    {"type": "object", "properties": {"enum": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 4,
                                               "uniqueItems": True}},
     "required": ["enum"], "additionalProperties": False},
]}
FIELD = {"anyOf": [
    LEAF,
    {"type": "object", "properties": {"type": {"const": "array"}, "items": LEAF,
                                      "minItems": {"type": "integer", "minimum": 0, "maximum": 2},
                                      "maxItems": {"type": "integer", "minimum": 2, "maximum": 5}},
     "required": ["type", "items"], "additionalProperties": False},
    {"type": "object", "properties": {"type": {"const": "object"},
                                      "properties": {"type": "object", "propertyNames": NAME, "minProperties": 1,
                                                     "maxProperties": 3, "additionalProperties": LEAF}},
     "required": ["type", "properties"], "additionalProperties": False},
]}
META = {"type": "object", "properties": {
    "type": {"const": "object"},
    "properties": {"type": "object", "propertyNames": NAME, "minProperties": 1, "maxProperties": 5,
                   "additionalProperties": FIELD},
    "required_share": {"type": "integer", "minimum": 0, "maximum": 2}},
    "required": ["type", "properties", "required_share"], "additionalProperties": False}


def _finish(schema: dict) -> dict:
    """A drawn schema made whole: `required` lists none, half or all of the properties, nested objects too."""
    share = schema.pop("required_share")
    names = sorted(schema["properties"])
    schema["required"] = names[: len(names) * share // 2]
    for field in schema["properties"].values():
        if field.get("type") == "object":
            field["required"] = sorted(field["properties"])
    return schema


def draw_schemas(count: int) -> list[dict]:
    """`count` distinct schemas drawn by hypothesis-jsonschema from `META` (derandomized: the same every time; its
    first examples are the simplest). Drawing is slow (~80 s for 300), so the suite reads the ones drawn once and
    kept in `SCHEMAS_FILE`: `python tests/test_structured_outputs.py` draws them again."""
    drawn: dict[str, dict] = {}

    @settings(max_examples=count + count // 4, derandomize=True, database=None, deadline=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(from_schema(META))
    def draw(schema):
        schema = _finish(schema)
        drawn.setdefault(json.dumps(schema, sort_keys=True), schema)

    draw()
    return list(drawn.values())[-count:]  # the later, richer ones


def load_schemas(count: int) -> list[dict]:
    schemas = json.loads(SCHEMAS_FILE.read_text())
    assert len(schemas) >= count, f"{SCHEMAS_FILE} has {len(schemas)} schemas; draw more"
    return schemas[:count]


@pytest.fixture(scope="module")
def llm():
    return LLM(num_speculative_tokens=1, max_num_seqs=64)


def _json_answers(llm, schemas, thinking: bool, max_tokens: int = 160):
    question = [{"role": "user", "content": "Describe the weather in Paris as JSON."}]
    plan = plan_chat(question, default_template_kwargs={"enable_thinking": thinking})
    params = [SamplingParams(max_tokens=max_tokens, temperature=0.7, seed=i,
                             structured_outputs=plan.structured_outputs(json=schema))
              for i, schema in enumerate(schemas)]
    return [o.outputs[0] for o in llm.generate([plan.prompt] * len(schemas), params, use_tqdm=False)]


@pytest.mark.parametrize("thinking", [True, False], ids=["thinking", "no-thinking"])
def test_every_answer_to_a_random_schema_parses_and_validates(llm, thinking):
    schemas = load_schemas(NUM_SCHEMAS)
    assert len(schemas) == NUM_SCHEMAS
    failures = []
    for schema, out in zip(schemas, _json_answers(llm, schemas, thinking), strict=True):
        reasoning, content = parse_reasoning(out.text)
        try:
            jsonschema.validate(json.loads(content), schema)
        except (TypeError, ValueError, jsonschema.ValidationError) as e:
            failures.append((schema, out.text, out.finish_reason, repr(e)[:200]))
        assert thinking or reasoning is None
    assert not failures, f"{len(failures)} of {len(schemas)} failed; first: {failures[0]}"


def test_forced_tool_calls_to_random_schemas_parse_and_validate(llm):
    schemas = load_schemas(int(os.environ.get("GLM45_TOOL_SCHEMAS", "40")))
    question = [{"role": "user", "content": "Do it."}]
    prompts, params, tools = [], [], []
    for i, schema in enumerate(schemas):
        declared = [{"type": "function", "function": {"name": f"tool_{i}", "parameters": schema}},
                    {"type": "function", "function": {"name": "other_tool", "parameters": {"type": "object"}}}]
        choice = "required" if i % 2 else {"type": "function", "function": {"name": f"tool_{i}"}}
        plan = plan_chat(question, declared, choice)
        prompts.append(plan.prompt)
        # Room for a second call: under "required" a sampled answer may make more than one.
        params.append(SamplingParams(max_tokens=320, temperature=0.7, seed=i,
                                     structured_outputs=plan.structured_outputs()))
        tools.append((declared, plan))
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for (declared, plan), out in zip(tools, outputs, strict=True):
        text = plan.forced_prefix + out.outputs[0].text
        _, calls = parse_tool_calls(text, declared)
        assert calls and out.outputs[0].finish_reason == "stop", text
        for call in calls:
            target = next(t for t in declared if t["function"]["name"] == call["name"])
            jsonschema.validate(call["arguments"], target["function"]["parameters"])


def test_mtp_and_batching_do_not_change_a_constrained_greedy_answer():
    # float32: in bf16, a batch's products round differently from one row's, which can flip a near-tie.
    schemas = load_schemas(6)
    question = [{"role": "user", "content": "Weather in Paris as JSON."}]
    plan = plan_chat(question)
    params = [SamplingParams(max_tokens=80, temperature=0, structured_outputs=plan.structured_outputs(json=s))
              for s in schemas]
    spec = LLM(dtype="float32", num_speculative_tokens=1, max_num_seqs=64)
    batched = [o.outputs[0].text for o in spec.generate([plan.prompt] * len(schemas), params, use_tqdm=False)]
    plain = LLM(dtype="float32")
    one_by_one = [plain.generate([plan.prompt], p, use_tqdm=False)[0].outputs[0].text for p in params]
    assert batched == one_by_one
    assert spec.engine.stats()["spec_acceptance_rates"][0] > 0.3


def test_thinking_budget_and_logit_bias(llm):
    plan = plan_chat([{"role": "user", "content": "What is 12*7?"}])
    budget = llm.generate([plan.prompt], SamplingParams(max_tokens=60, temperature=0.8, seed=3, thinking_budget=6),
                          use_tqdm=False)[0].outputs[0]
    reasoning, _ = parse_reasoning(budget.text)
    assert "</think>" in budget.text and len(llm.tokenizer.encode(budget.text.split("</think>")[0])) <= 6
    target = llm.tokenizer.encode("zebra")[0]
    forced = llm.generate([plan.prompt], SamplingParams(max_tokens=4, temperature=0.8, seed=1,
                                                        logit_bias={target: 100}), use_tqdm=False)[0].outputs[0]
    assert forced.token_ids == [target] * 4
    banned = SamplingParams(max_tokens=8, temperature=0, logit_bias={t: -100 for t in llm.tokenizer.encode("\n")})
    assert "\n" not in llm.generate([plan.prompt], banned, use_tqdm=False)[0].outputs[0].text


def test_structured_outputs_spec_from_a_plan():
    plan = plan_chat([{"role": "user", "content": "hi"}], default_template_kwargs={"enable_thinking": False})
    assert plan.structured_outputs() is None
    spec = plan.structured_outputs(json={"type": "object"})
    assert spec == StructuredOutputsParams(json={"type": "object"}, reasoning=False)


if __name__ == "__main__":
    SCHEMAS_FILE.parent.mkdir(exist_ok=True)
    SCHEMAS_FILE.write_text(json.dumps(draw_schemas(int(os.environ.get("COUNT", "240"))), indent=None) + "\n")
    print(f"wrote {SCHEMAS_FILE}")
