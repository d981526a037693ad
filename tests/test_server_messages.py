"""`POST /v1/messages` (the Anthropic Messages API) end to end: a real server on the bundled model, driven by the
official `anthropic` SDK — non-streaming and streaming (the same message either way), a tool-use round trip,
thinking blocks and the thinking budget, count_tokens, structured output, errors in Anthropic's shape, and
`x-api-key` auth with model-name patterns (Claude Code sends its own model names)."""

from __future__ import annotations

import json

import anthropic
import jsonschema
import pytest
from server_helpers import ServerThread

from glm45.config import bundled_model_path
from glm45.server.config import ServerConfig

WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
QUESTION = [{"role": "user", "content": "What's the weather like in Paris right now?"}]
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def server():
    config = ServerConfig(served_model_name=["glm45-tiny", "claude-*"], api_key="sesame")
    with ServerThread(bundled_model_path(), config, num_speculative_tokens=1) as server:
        yield server


def client(server, **kwargs) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="sesame", max_retries=0, timeout=60, **kwargs)


def _blocks(message) -> list[dict]:
    """The content blocks, without the tool-call ids (new for every answer)."""
    return [block.model_dump(exclude_none=True, exclude={"parsed_output", "id"}) for block in message.content]


def test_non_streaming_and_streaming_give_the_same_message(server):
    kwargs = dict(model="claude-glm-agent", max_tokens=120, messages=QUESTION, tools=[WEATHER],
                  thinking={"type": "enabled", "budget_tokens": 60}, extra_body=GREEDY)
    whole = client(server).messages.create(**kwargs)
    with client(server).messages.stream(**kwargs) as stream:
        kinds = [event.type for event in stream]
        streamed = stream.get_final_message()
    assert whole.model == "claude-glm-agent" and whole.role == "assistant"
    assert _blocks(whole) == _blocks(streamed)
    assert (whole.stop_reason, whole.usage.input_tokens, whole.usage.output_tokens) == \
        (streamed.stop_reason, streamed.usage.input_tokens, streamed.usage.output_tokens)
    assert kinds[0] == "message_start" and "content_block_start" in kinds and kinds[-1] == "message_stop"
    assert [b["type"] for b in _blocks(whole)][0] == "thinking" and whole.content[0].signature


def test_tool_use_round_trip(server):
    c = client(server)
    first = c.messages.create(model="glm45-tiny", max_tokens=160, messages=QUESTION, tools=[WEATHER],
                              tool_choice={"type": "any"}, extra_body=GREEDY)
    assert first.stop_reason == "tool_use"
    call = next(block for block in first.content if block.type == "tool_use")
    assert call.name == "get_weather" and jsonschema.validate(call.input, WEATHER["input_schema"]) is None
    # A result shaped as the bundled model's training tool results (JSON); to a plain-text one such as "18°C, sunny"
    # its greedy answer may repeat itself up to max_tokens.
    result = '{"city": "Paris", "temperature": 18, "unit": "celsius", "condition": "sunny"}'
    history = QUESTION + [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                          {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                                        "content": [{"type": "text", "text": result}]}]}]
    second = c.messages.create(model="glm45-tiny", max_tokens=120, messages=history, tools=[WEATHER],
                               extra_body=GREEDY)
    assert second.stop_reason == "end_turn"
    assert "18" in "".join(b.text for b in second.content if b.type == "text")  # the result reached the model
    named = c.messages.create(model="glm45-tiny", max_tokens=160, messages=QUESTION, tools=[WEATHER],
                              tool_choice={"type": "tool", "name": "get_weather"})
    assert [b.name for b in named.content if b.type == "tool_use"] == ["get_weather"]


def test_thinking_blocks_and_budget(server):
    c = client(server)
    off = c.messages.create(model="glm45-tiny", max_tokens=60, messages=QUESTION, extra_body=GREEDY)
    assert all(block.type != "thinking" for block in off.content)
    budget = c.messages.create(model="glm45-tiny", max_tokens=80, messages=[{"role": "user", "content": "Hi!"}],
                               thinking={"type": "enabled", "budget_tokens": 5}, extra_body={"temperature": 0.9})
    thoughts = [block.thinking for block in budget.content if block.type == "thinking"]
    assert all(len(server.engine.tokenizer.encode(t)) <= 5 for t in thoughts)
    # a past thinking block goes back into the conversation as its reasoning
    history = [{"role": "user", "content": "Hi"},
               {"role": "assistant", "content": [{"type": "thinking", "thinking": "Greet back.", "signature": "x"},
                                                 {"type": "text", "text": "Hello!"}]},
               {"role": "user", "content": "And now?"}]
    assert c.messages.count_tokens(model="glm45-tiny", messages=history).input_tokens > 10


def test_count_tokens_and_structured_output(server):
    c = client(server)
    count = c.messages.count_tokens(model="claude-haiku", messages=QUESTION, system="Be brief.", tools=[WEATHER])
    assert count.input_tokens > c.messages.count_tokens(model="claude-haiku", messages=QUESTION).input_tokens
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "celsius": {"type": "integer"}},
              "required": ["city", "celsius"], "additionalProperties": False}
    message = c.messages.create(model="glm45-tiny", max_tokens=100, messages=QUESTION,
                                extra_body={"output_config": {"format": {"type": "json_schema", "schema": schema}}})
    text = "".join(block.text for block in message.content if block.type == "text")
    jsonschema.validate(json.loads(text), schema)


def test_errors_have_anthropics_shape(server):
    c = client(server)
    with pytest.raises(anthropic.AuthenticationError) as error:
        anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0).messages.create(
            model="glm45-tiny", max_tokens=5, messages=QUESTION)
    assert error.value.body["type"] == "error" and error.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError) as error:
        c.messages.create(model="gpt-4o", max_tokens=5, messages=QUESTION)
    assert error.value.body["error"]["type"] == "not_found_error"
    cases = [
        dict(max_tokens=50, thinking={"type": "enabled", "budget_tokens": 50}),
        dict(max_tokens=5000),
        dict(max_tokens=5, tools=[WEATHER], tool_choice={"type": "tool", "name": "nope"}),
        dict(max_tokens=5, messages=[{"role": "user", "content": [{"type": "image", "source": {
            "type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]),
        dict(max_tokens=5, tools=[{**WEATHER, "input_schema": {"type": "object", "properties": {
            "x": {"type": "string", "pattern": "(?<=a)b"}}}}], tool_choice={"type": "any"}),
    ]
    for case in cases:
        with pytest.raises(anthropic.BadRequestError) as error:
            c.messages.create(**{"model": "glm45-tiny", "messages": QUESTION, **case})
        assert error.value.body["type"] == "error"
        assert error.value.body["error"]["type"] == "invalid_request_error", error.value.body
    # Bearer works too (OpenAI-style clients), and the server still serves
    bearer = anthropic.Anthropic(base_url=server.url, auth_token="sesame", max_retries=0)
    assert bearer.messages.create(model="glm45-tiny", max_tokens=3, messages=QUESTION).usage.output_tokens <= 3
