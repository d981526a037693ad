"""The chat endpoint's decoding controls, end to end on the bundled model with the official `openai` client:
`response_format` (json_object, json_schema), vLLM's `structured_outputs` / `guided_*`, tool_choice required and
named (valid calls), `--tool-call-constraint`, `logit_bias`, `reasoning_effort` and `thinking_budget`."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from server_helpers import ServerThread

from glm45.config import bundled_model_path
from glm45.server.config import ServerConfig

QUESTION = [{"role": "user", "content": "What's the weather like in Paris right now?"}]
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                           "celsius": {"type": "integer", "minimum": -50, "maximum": 60},
                                           "sky": {"enum": ["sunny", "cloudy", "rain"]}},
          "required": ["city", "celsius", "sky"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city", "days"]}}}
LOOKUP = {"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}


@pytest.fixture(scope="module")
def server():
    with ServerThread(bundled_model_path(), ServerConfig(served_model_name=["glm45-tiny"]),
                      num_speculative_tokens=2) as server:
        yield server


def chat(server, **kwargs):
    client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=60)
    return client.chat.completions.create(model="glm45-tiny", messages=QUESTION, **kwargs)


@pytest.mark.parametrize("thinking", [True, False])
def test_response_format_json_schema_streamed_and_not(server, thinking):
    kwargs = dict(max_tokens=150, temperature=0, extra_body={"chat_template_kwargs": {"enable_thinking": thinking}},
                  response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA,
                                                                          "strict": True}})
    whole = chat(server, **kwargs).choices[0]
    jsonschema.validate(json.loads(whole.message.content), SCHEMA)
    assert whole.finish_reason == "stop" and (whole.message.reasoning_content is None) == (not thinking)
    chunks = list(chat(server, stream=True, **kwargs))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.message.content


def test_other_answer_formats(server):
    assert isinstance(json.loads(chat(server, max_tokens=60, response_format={"type": "json_object"})
                                 .choices[0].message.content), dict)
    guided = chat(server, max_tokens=60, extra_body={"guided_json": json.dumps(SCHEMA)}).choices[0].message.content
    jsonschema.validate(json.loads(guided), SCHEMA)
    choice = chat(server, max_tokens=60, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert choice.choices[0].message.content in ("yes", "no")
    regex = chat(server, max_tokens=60, extra_body={"guided_regex": "[0-9]{3}-[a-z]{2}",
                                                    "chat_template_kwargs": {"enable_thinking": False}})
    assert len(regex.choices[0].message.content) == 6


def test_forced_tool_calls_are_valid(server):
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        for seed in range(3):
            answer = chat(server, max_tokens=120, temperature=1.0, seed=seed, tools=[WEATHER, LOOKUP],
                          tool_choice=choice).choices[0]
            assert answer.finish_reason == "tool_calls" and answer.message.tool_calls, answer
            for call in answer.message.tool_calls:
                tool = WEATHER if call.function.name == "get_weather" else LOOKUP
                jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
            if isinstance(choice, dict):
                assert [c.function.name for c in answer.message.tool_calls] == ["get_weather"]


def test_logit_bias_reasoning_effort_and_thinking_budget(server):
    client_tokens = server.engine.tokenizer.encode("Paris")
    biased = chat(server, max_tokens=3, temperature=1.0, seed=0, logit_bias={str(client_tokens[0]): 100},
                  extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert biased.choices[0].message.content.startswith("Paris")
    off = chat(server, max_tokens=60, temperature=0, reasoning_effort="none").choices[0].message
    assert off.reasoning_content is None
    budget = chat(server, max_tokens=80, temperature=0.9, seed=1, extra_body={"thinking_budget": 4})
    reasoning = budget.choices[0].message.reasoning_content or ""
    assert len(server.engine.tokenizer.encode(reasoning)) <= 4


def test_tool_call_constraint_flag(tmp_path):
    assert ServerConfig(tool_call_constraint="full").tool_call_constraint == "full"
    with pytest.raises(ValueError, match="tool_call_constraint"):
        ServerConfig(tool_call_constraint="strict")
