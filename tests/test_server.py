"""The OpenAI-compatible server, end to end: a real uvicorn server on a loopback port, driven by the official
`openai` client (and by raw HTTP where a client would refuse to send the mistake)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import urllib.error
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_helpers import (
    CLOCK_TOOL,
    SCRIPT_ANSWER,
    SCRIPT_CITY,
    SCRIPT_CONTENT,
    SCRIPT_REASONING,
    WEATHER_TOOL,
    ServerThread,
    save_random_model,
    save_scripted_model,
)

from glm45.chat import GLM45_CHAT_TEMPLATE, render_chat
from glm45.config import EngineConfig
from glm45.engine import LLMEngine, SamplingParams
from glm45.server.async_engine import AsyncEngine
from glm45.server.config import ServerConfig

USER = [{"role": "user", "content": "What is the weather in Beijing?"}]


@pytest.fixture(scope="module")
def random_server(tmp_path_factory):
    folder = save_random_model(tmp_path_factory.mktemp("random_model"))
    with ServerThread(folder, ServerConfig(max_request_body_bytes=64 * 1024)) as server:
        yield server


@pytest.fixture(scope="module")
def scripted_server(tmp_path_factory):
    folder = save_scripted_model(tmp_path_factory.mktemp("scripted_model"))
    with ServerThread(folder) as server:
        yield server


def client(server, api_key: str = "unused", timeout: float = 60) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=api_key, max_retries=0, timeout=timeout)


def http(server, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None):
    """(status, parsed JSON or text) of a raw HTTP request."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(server.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def metrics(server) -> dict[str, float]:
    status, text = http(server, "GET", "/metrics")
    assert status == 200
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if "le" in sample.labels:
                continue
            labels = "".join(f"[{v}]" for k, v in sorted(sample.labels.items()) if k != "model_name")
            values[sample.name + labels] = sample.value
    return values


def joined_stream(chunks) -> dict[int, dict]:
    """Per choice index: role, content, reasoning, tool calls (name, arguments) and finish reason of a stream."""
    out: dict[int, dict] = {}
    usage = None
    for chunk in chunks:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            slot = out.setdefault(choice.index, {"content": "", "reasoning": "", "calls": {}, "finish": None,
                                                 "role": None})
            delta = choice.delta
            slot["role"] = slot["role"] or delta.role
            slot["content"] += delta.content or ""
            slot["reasoning"] += getattr(delta, "reasoning_content", None) or ""
            for call in delta.tool_calls or []:
                entry = slot["calls"].setdefault(call.index, {"name": None, "arguments": "", "id": None})
                entry["id"] = entry["id"] or call.id
                entry["name"] = entry["name"] or call.function.name
                entry["arguments"] += call.function.arguments or ""
            if choice.finish_reason is not None:
                slot["finish"] = choice.finish_reason
    for slot in out.values():
        slot["usage"] = usage
    return out


def as_joined(choice) -> dict:
    """A non-streamed choice in the shape of `joined_stream`'s entries."""
    message = choice.message
    return {
        "content": message.content or "",
        "reasoning": getattr(message, "reasoning_content", None) or "",
        "calls": {i: (c.function.name, c.function.arguments) for i, c in enumerate(message.tool_calls or [])},
        "finish": choice.finish_reason,
    }


def streamed_calls(slot: dict) -> dict:
    return {i: (c["name"], c["arguments"]) for i, c in slot["calls"].items()}


# ---------------------------------------------------------------------------------------------------
# Endpoints and plain chat


def test_models_health_version(random_server):
    models = client(random_server).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert models.data[0].max_model_len == 1024
    assert http(random_server, "GET", "/health")[0] == 200
    status, body = http(random_server, "GET", "/version")
    assert status == 200 and body["version"]


def test_chat_streaming_equals_non_streaming(random_server):
    c = client(random_server)
    request = dict(model="tiny", messages=USER, max_tokens=24, seed=7, temperature=1.0, top_p=0.9)
    response = c.chat.completions.create(**request)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert response.usage.completion_tokens <= 24
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    chunks = list(c.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    streamed = joined_stream(chunks)[0]
    assert streamed["role"] == "assistant"
    expected = as_joined(choice)
    assert (streamed["content"], streamed["reasoning"], streamed["finish"]) == (
        expected["content"], expected["reasoning"], expected["finish"])
    # usage comes in a last chunk without choices, and counts the same tokens
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump()["completion_tokens"] == \
        response.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == response.usage.prompt_tokens
    # without include_usage, no usage chunk
    assert all(chunk.usage is None for chunk in c.chat.completions.create(**request, stream=True))


def test_n2_logprobs_and_stop(random_server):
    c = client(random_server)
    request = dict(model="tiny", messages=USER, max_tokens=12, seed=3, n=2, logprobs=True, top_logprobs=2)
    response = c.chat.completions.create(**request)
    assert sorted(ch.index for ch in response.choices) == [0, 1]
    assert response.choices[0].message.content != response.choices[1].message.content
    assert response.usage.completion_tokens == sum(len(ch.logprobs.content) for ch in response.choices)
    for choice in response.choices:
        for entry in choice.logprobs.content:
            top = [t.logprob for t in entry.top_logprobs]
            assert len(top) == 2 and top == sorted(top, reverse=True)
            assert entry.logprob <= top[0] + 1e-6 <= 1e-6  # nothing beats the most likely token
    streamed = joined_stream(c.chat.completions.create(**request, stream=True))
    for choice in response.choices:
        assert streamed[choice.index]["content"] == (choice.message.content or "")
        assert streamed[choice.index]["finish"] == choice.finish_reason
    # a stop string taken from the middle of an answer cuts it there
    request = dict(model="tiny", messages=USER, max_tokens=30, seed=3, extra_body={"ignore_eos": True})
    text = c.chat.completions.create(**request).choices[0].message.content
    assert len(text) >= 10
    stop = text[len(text) // 2:len(text) // 2 + 3]
    stopped = c.chat.completions.create(**request, stop=[stop])
    assert stopped.choices[0].message.content == (text[:text.find(stop)].lstrip("\n") or None)
    assert stopped.choices[0].finish_reason == "stop"


def test_completions(random_server):
    c = client(random_server)
    response = c.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=8, temperature=0,
                                    logprobs=2)
    choice = response.choices[0]
    assert choice.finish_reason in ("stop", "length") and response.usage.completion_tokens <= 8
    assert len(choice.logprobs.tokens) == response.usage.completion_tokens
    assert all(len(top) >= 2 for top in choice.logprobs.top_logprobs)
    streamed = list(c.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=8, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == choice.text
    assert streamed[-1].usage.completion_tokens == response.usage.completion_tokens
    # several prompts, token-id prompts, echo, n
    ids = http(random_server, "POST", "/tokenize", {"prompt": "The quick brown fox"})[1]["tokens"]
    batch = c.completions.create(model="tiny", prompt=["The quick brown fox", "Hello"], max_tokens=8, temperature=0,
                                 n=2)
    assert sorted(ch.index for ch in batch.choices) == [0, 1, 2, 3]
    assert batch.choices[0].text == choice.text
    merged: dict[int, str] = {}
    for chunk in c.completions.create(model="tiny", prompt=["The quick brown fox", "Hello"], max_tokens=8,
                                      temperature=0, n=2, stream=True, echo=True):
        for ch in chunk.choices:
            merged[ch.index] = merged.get(ch.index, "") + ch.text
    prompts = ["The quick brown fox"] * 2 + ["Hello"] * 2
    assert merged == {ch.index: prompts[ch.index] + ch.text for ch in batch.choices}
    by_ids = c.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0, echo=True)
    assert by_ids.choices[0].text == "The quick brown fox" + choice.text
    detok = http(random_server, "POST", "/detokenize", {"tokens": ids})[1]
    assert detok["prompt"] == "The quick brown fox"


def test_metrics(random_server):
    c = client(random_server)
    before = metrics(random_server)
    c.chat.completions.create(model="tiny", messages=USER, max_tokens=5, temperature=0)
    after = metrics(random_server)
    assert after["glm45:generation_tokens_total"] >= before["glm45:generation_tokens_total"] + 1
    assert after["glm45:prompt_tokens_total"] > before["glm45:prompt_tokens_total"]
    assert after["glm45:time_to_first_token_seconds_count"] == before["glm45:time_to_first_token_seconds_count"] + 1
    assert after["glm45:e2e_request_latency_seconds_count"] >= 1
    assert after["glm45:time_per_output_token_seconds_count"] > before["glm45:time_per_output_token_seconds_count"]
    # the same conversation again hits the prefix cache
    c.chat.completions.create(model="tiny", messages=USER, max_tokens=5, temperature=0)
    again = metrics(random_server)
    assert again["glm45:prefix_cache_hits_total"] > after["glm45:prefix_cache_hits_total"]
    for name in ("glm45:num_requests_running", "glm45:num_requests_waiting", "glm45:kv_cache_usage_perc",
                 "glm45:num_preemptions_total", "glm45:spec_decode_mean_accepted_length"):
        assert name in again
    assert again["glm45:kv_cache_usage_perc"] == 0.0
    # the host cache's pages: some written by the requests, at most the whole cache
    assert 0 < again["glm45:kv_cache_resident_bytes"] <= again["glm45:kv_cache_bytes"]


# ---------------------------------------------------------------------------------------------------
# Thinking and tool calls (the scripted model)


def test_thinking_on_and_off(scripted_server):
    c = client(scripted_server)
    request = dict(model="tiny", messages=USER, max_tokens=40, temperature=0)
    thinking = c.chat.completions.create(**request)
    message = thinking.choices[0].message
    assert message.reasoning_content == SCRIPT_REASONING and message.content == SCRIPT_ANSWER
    off = c.chat.completions.create(**request, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert getattr(off.choices[0].message, "reasoning_content", None) is None
    assert off.choices[0].message.content == SCRIPT_ANSWER
    assert off.usage.prompt_tokens > thinking.usage.prompt_tokens  # `/nothink` and `<think></think>` were added
    streamed = joined_stream(c.chat.completions.create(**request, stream=True))[0]
    assert (streamed["reasoning"], streamed["content"]) == (SCRIPT_REASONING, SCRIPT_ANSWER)
    streamed_off = joined_stream(c.chat.completions.create(
        **request, stream=True, extra_body={"chat_template_kwargs": {"enable_thinking": False}}))[0]
    assert (streamed_off["reasoning"], streamed_off["content"]) == ("", SCRIPT_ANSWER)


def test_tool_call_round_trip(scripted_server):
    c = client(scripted_server)
    request = dict(model="tiny", messages=USER, tools=[WEATHER_TOOL, CLOCK_TOOL], max_tokens=40, temperature=0)
    first = c.chat.completions.create(**request)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": SCRIPT_CITY}
    assert choice.message.reasoning_content == SCRIPT_REASONING and choice.message.content == SCRIPT_CONTENT
    # streamed: the same reasoning, content, call name and arguments, in several pieces
    chunks = list(c.chat.completions.create(**request, stream=True))
    streamed = joined_stream(chunks)[0]
    assert streamed_calls(streamed) == as_joined(choice)["calls"]
    assert (streamed["reasoning"], streamed["content"], streamed["finish"]) == (
        SCRIPT_REASONING, SCRIPT_CONTENT, "tool_calls")
    assert streamed["calls"][0]["id"].startswith("call_")
    assert sum(1 for ch in chunks for x in ch.choices if x.delta.tool_calls) >= 3  # arguments arrive in fragments

    # Step two: the call and its result go back (thinking off), and the server renders them as GLM-4.5 expects.
    history = [*USER, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'}]
    second = c.chat.completions.create(**{**request, "messages": history},
                                       extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert second.choices[0].finish_reason in ("tool_calls", "stop")
    tokenized = http(scripted_server, "POST", "/tokenize", {"messages": history, "tools": [WEATHER_TOOL, CLOCK_TOOL],
                                                             "chat_template_kwargs": {"enable_thinking": False}})[1]
    plain_history = [*USER, {"role": "assistant", "content": SCRIPT_CONTENT, "reasoning_content": SCRIPT_REASONING,
                             "tool_calls": [{"id": call.id, "type": "function", "function": {
                                 "name": "get_weather", "arguments": call.function.arguments}}]}, history[-1]]
    expected = render_chat(plain_history, tools=[WEATHER_TOOL, CLOCK_TOOL], enable_thinking=False)
    assert "<tool_response>\n{\"temperature\": 21" in expected and f"<arg_value>{SCRIPT_CITY}</arg_value>" in expected
    assert tokenized["tokens"] == scripted_server.engine.tokenizer.encode(expected)
    assert second.usage.prompt_tokens == tokenized["count"]


def test_tool_choice(scripted_server):
    c = client(scripted_server)
    base = dict(model="tiny", messages=USER, tools=[WEATHER_TOOL, CLOCK_TOOL], max_tokens=40, temperature=0)
    # none: no tools in the prompt, nothing parsed as a call
    none = c.chat.completions.create(**base, tool_choice="none")
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason == "stop"
    assert "<tool_call>get_weather" in none.choices[0].message.content
    # required and named: the answer is prefilled with the opening of a call; no thinking in that turn
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        response = c.chat.completions.create(**base, tool_choice=choice)
        message = response.choices[0].message
        assert response.choices[0].finish_reason == "tool_calls"
        assert [(t.function.name, json.loads(t.function.arguments)) for t in message.tool_calls] == [
            ("get_weather", {"city": SCRIPT_CITY})]
        assert getattr(message, "reasoning_content", None) is None and message.content is None
        streamed = joined_stream(c.chat.completions.create(**base, tool_choice=choice, stream=True))[0]
        assert streamed_calls(streamed) == as_joined(response.choices[0])["calls"]
        assert streamed["finish"] == "tool_calls"
    # naming the other tool makes the model continue a call to that one
    clock = c.chat.completions.create(**base, tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert [t.function.name for t in clock.choices[0].message.tool_calls] == ["get_time"]
    # when the model does not finish the call (here: max_tokens), the answer says so instead of inventing one
    short = c.chat.completions.create(**{**base, "max_tokens": 3}, tool_choice="required")
    assert short.choices[0].finish_reason == "length" and short.choices[0].message.tool_calls is None


# ---------------------------------------------------------------------------------------------------
# Client mistakes: status, error shape, and the server keeps serving


def _assert_error(status: int, body, expected_status: int, param: str | None = None, words: tuple = ()):
    assert status == expected_status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    if param is not None:
        assert body["error"]["param"] == param, body
    for word in words:
        assert word in body["error"]["message"], body


def test_bad_inputs_get_their_status_and_the_server_keeps_serving(random_server):
    good = {"model": "tiny", "messages": USER, "max_tokens": 3}
    cases = [
        (b'{"model": "tiny", "messages": [', 400, None, ("JSON",)),
        ({"model": "tiny"}, 400, "messages", ()),
        ({**good, "messages": [{"role": "wizard", "content": "hi"}]}, 400, None, ()),
        ({**good, "messages": []}, 400, "messages", ()),
        ({**good, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages", ("tool",)),
        ({**good, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         400, "messages", ("image_url",)),
        ({**good, "model": "gpt-5"}, 404, "model", ("gpt-5",)),
        ({**good, "max_tokens": 5000}, 400, "max_tokens", ("1024", "5000")),
        ({**good, "messages": [{"role": "user", "content": "fox " * 1200}]}, 400, "messages", ("1024",)),
        ({**good, "temperature": -1}, 400, "temperature", ()),
        ({**good, "top_p": 0}, 400, "top_p", ()),
        ({**good, "temperature": "hot"}, 400, "temperature", ()),
        ({**good, "n": 0}, 400, "n", ()),
        ({**good, "max_tokens": 0}, 400, "max_tokens", ()),
        ({**good, "presence_penalty": 3}, 400, "presence_penalty", ()),
        ({**good, "top_logprobs": 3}, 400, "top_logprobs", ()),
        ({**good, "logprobs": True, "top_logprobs": 50}, 400, "logprobs", ()),
        ({**good, "tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         400, "tool_choice", ("nope",)),
        ({**good, "tool_choice": "required"}, 400, "tool_choice", ()),
        ({**good, "logit_bias": {"5": 101}}, 400, "logit_bias", ("100",)),
        ({**good, "logit_bias": {"99999": 1}}, 400, "logit_bias", ("99999",)),
        ({**good, "logit_bias": {"five": 1}}, 400, "logit_bias", ("five",)),
        ({**good, "response_format": {"type": "xml"}}, 400, None, ("response_format",)),
        ({**good, "response_format": {"type": "json_schema"}}, 400, "response_format.json_schema", ("schema",)),
        ({**good, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "string", "pattern": "(?<=a)b"}}}}, 400, "response_format", ("Lookbehind",)),
        ({**good, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "nope"}}}}, 400, "response_format.json_schema.schema", ("not a valid JSON Schema",)),
        ({**good, "response_format": {"type": "json_object"}, "guided_regex": "a+"}, 400, None, ("one answer",)),
        ({**good, "thinking_budget": 3}, 400, "thinking_budget", ("max_tokens",)),
        ({**good, "reasoning_effort": "extreme"}, 400, "reasoning_effort", ()),
        ({**good, "chat_template_kwargs": {"enable_thinking": "yes"}}, 400, "chat_template_kwargs", ()),
    ]
    for body, status, param, words in cases:
        _assert_error(*http(random_server, "POST", "/v1/chat/completions", body), status, param, words)
        ok_status, ok = http(random_server, "POST", "/v1/chat/completions", good)
        assert ok_status == 200 and ok["choices"][0]["finish_reason"] in ("stop", "length"), (body, ok)
    completion_cases = [
        ({"model": "tiny", "prompt": [999999], "max_tokens": 2}, 400, None, ("vocabulary",)),
        ({"model": "tiny", "prompt": [], "max_tokens": 2}, 400, "prompt", ()),
        ({"model": "tiny", "prompt": "x", "suffix": "y"}, 400, "suffix", ()),
        ({"model": "tiny", "prompt": "x", "max_tokens": 1024}, 400, "max_tokens", ("1024",)),
    ]
    for body, status, param, words in completion_cases:
        _assert_error(*http(random_server, "POST", "/v1/completions", body), status, param, words)
    _assert_error(*http(random_server, "POST", "/v1/chat/completions", b"x" * (100 * 1024)), 413)
    _assert_error(*http(random_server, "GET", "/v1/nothing"), 404)
    _assert_error(*http(random_server, "POST", "/detokenize", {"tokens": [-1]}), 400, "tokens")
    # the openai client sees the same as exceptions with the status
    with pytest.raises(openai.NotFoundError):
        client(random_server).chat.completions.create(model="other", messages=USER)
    with pytest.raises(openai.BadRequestError) as error:
        client(random_server).chat.completions.create(model="tiny", messages=USER, max_tokens=4000, stream=True)
    assert "maximum context length is 1024" in str(error.value)
    assert client(random_server).chat.completions.create(model="tiny", messages=USER, max_tokens=2).choices


def test_api_key_custom_template_and_parsers_off(tmp_path):
    """--api-key guards /v1/* and the tokenizer endpoints, not /health or /metrics; --chat-template renders with
    the given jinja file; with --reasoning-parser none and --tool-call-parser none the raw text is the content."""
    folder = save_scripted_model(tmp_path / "model")
    template = tmp_path / "template.jinja"
    custom = GLM45_CHAT_TEMPLATE.replace("[gMASK]<sop>", "[gMASK]<sop>Custom template.")
    assert custom != GLM45_CHAT_TEMPLATE
    template.write_text(custom)
    config = ServerConfig(api_key="sesame", chat_template=str(template), reasoning_parser="none",
                          tool_call_parser="none")
    with ServerThread(folder, config) as server:
        for path in ("/v1/models", "/tokenize"):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
                method = "GET" if path == "/v1/models" else "POST"
                _assert_error(*http(server, method, path, {"prompt": "x"}, headers), 401)
        _assert_error(*http(server, "POST", "/v1/chat/completions", {"model": "tiny", "messages": USER}), 401)
        assert http(server, "GET", "/health")[0] == 200
        assert http(server, "GET", "/metrics")[0] == 200
        with pytest.raises(openai.AuthenticationError):
            client(server, api_key="wrong").models.list()
        c = client(server, api_key="sesame")
        response = c.chat.completions.create(model="tiny", messages=USER, max_tokens=40, temperature=0)
        message = response.choices[0].message
        assert message.content == f"<think>{SCRIPT_REASONING}</think>{SCRIPT_ANSWER}"
        assert getattr(message, "reasoning_content", None) is None
        with pytest.raises(openai.BadRequestError, match="tool-call-parser"):
            c.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER_TOOL])
        status, tokenized = http(server, "POST", "/tokenize", {"messages": USER},
                                 {"Authorization": "Bearer sesame"})
        assert status == 200
        assert tokenized["tokens"] == server.engine.tokenizer.encode(render_chat(USER, chat_template=custom))
        assert server.engine.tokenizer.decode(tokenized["tokens"]).startswith("Custom template.")
        assert response.usage.prompt_tokens == tokenized["count"]


# ---------------------------------------------------------------------------------------------------
# Load: many streams at once, and clients that go away


def test_64_concurrent_streams(random_server):
    c = client(random_server)
    prompts = [f"Question {i}: how are you?" for i in range(4)]
    expected = [c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": p}], max_tokens=8,
                                          temperature=0).choices[0].message.content or "" for p in prompts]
    aclient = openai.AsyncOpenAI(base_url=random_server.base_url, api_key="unused", max_retries=0, timeout=120)

    async def one(i: int) -> tuple[str, str | None, bool]:
        stream = await aclient.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": prompts[i % 4]}], max_tokens=8, temperature=0,
            stream=True, stream_options={"include_usage": True})
        text, finish, usage = "", None, False
        async for chunk in stream:
            usage = usage or chunk.usage is not None
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
        return text, finish, usage

    async def main():
        try:
            return await asyncio.gather(*(one(i) for i in range(64)))
        finally:
            await aclient.close()

    results = asyncio.run(main())
    for i, (text, finish, usage) in enumerate(results):
        assert text == expected[i % 4] and finish in ("stop", "length") and usage, (i, text, finish)


def wait_until_idle(server, seconds: float = 20) -> dict:
    """Poll /metrics until no request runs and the KV cache is empty; returns the last metrics read."""
    deadline = time.monotonic() + seconds
    while True:
        values = metrics(server)
        if values["glm45:kv_cache_usage_perc"] == 0.0 and values["glm45:num_requests_running"] == 0:
            return values
        assert time.monotonic() < deadline, values
        time.sleep(0.05)


def test_disconnected_streams_free_their_kv_blocks(random_server, caplog):
    caplog.set_level(logging.INFO)
    c = client(random_server)
    before = metrics(random_server)["glm45:generation_tokens_total"]
    streams = []
    for i in range(16):
        stream = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"story {i}"}],
                                           max_tokens=1000, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        streams.append(stream)
    for stream in streams:
        for _, _chunk in zip(range(3), stream, strict=False):
            pass
    assert metrics(random_server)["glm45:kv_cache_usage_perc"] > 0
    for stream in streams:
        stream.close()
    values = wait_until_idle(random_server)
    assert values["glm45:request_success_total[abort]"] >= 16
    assert random_server.app.state.async_engine.num_in_flight == 0
    # the engine did not run the aborted requests to their end
    assert values["glm45:generation_tokens_total"] < before + 16 * 1000
    assert not [r for r in caplog.records if r.exc_info], "a disconnect is not an error"
    assert client(random_server).chat.completions.create(model="tiny", messages=USER, max_tokens=2).choices


def test_disconnected_non_streaming_requests_are_aborted(random_server, caplog):
    """A client that gives up on a non-streamed answer (here: its timeout) does not leave the request running."""
    caplog.set_level(logging.INFO)
    before = metrics(random_server)
    # 32 × 1000 tokens take over a second on the 2-core machine, five times the 0.2 s the client waits (8 × 1000 can
    # finish in about 0.24 s: too close).
    impatient = client(random_server, timeout=0.2)
    for i in range(4):
        with pytest.raises(openai.APITimeoutError):
            impatient.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"essay {i}"}],
                                              max_tokens=1000, n=32, temperature=0, extra_body={"ignore_eos": True})
    values = wait_until_idle(random_server)
    assert values["glm45:request_success_total[abort]"] >= before.get("glm45:request_success_total[abort]", 0) + 4
    assert values["glm45:generation_tokens_total"] < before["glm45:generation_tokens_total"] + 4 * 32 * 1000
    # the handler logs the disconnect after the engine aborted the request: the last line may follow the idle metrics
    deadline = time.monotonic() + 10
    while sum("client disconnected" in r.getMessage() for r in caplog.records) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sum("client disconnected" in r.getMessage() for r in caplog.records) == 4
    assert not [r for r in caplog.records if r.exc_info], "a disconnect is not an error"


def test_chunked_body_over_the_limit_and_clean_error_logs(random_server, caplog):
    """A body without Content-Length is counted as it arrives; client errors are logged in one line, no traceback."""
    import socket

    caplog.set_level(logging.INFO, logger="glm45.server")
    piece = b"x" * 8192
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(9)) + b"0\r\n\r\n"
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    with socket.create_connection(("127.0.0.1", random_server.port), timeout=30) as sock:
        try:
            sock.sendall(head + chunks)
        except OSError:  # the server may answer and close before reading everything
            pass
        raw = b""
        while data := sock.recv(65536):
            raw += data
    status = int(raw.split(b" ", 2)[1])
    body = json.loads(raw.split(b"\r\n\r\n", 1)[1])
    _assert_error(status, body, 413)
    _assert_error(*http(random_server, "POST", "/v1/chat/completions", {"model": "tiny"}), 400)
    records = [r for r in caplog.records if r.name.startswith("glm45.server")]
    assert any("-> 413" in r.getMessage() for r in records) and any("-> 400" in r.getMessage() for r in records)
    assert not any(r.exc_info for r in records)


def test_bridge_survives_a_handler_cancelled_before_its_request_was_accepted(tmp_path):
    """A handler cancelled while its add is still queued (its client left at once) must not kill the engine
    thread, and the request must not run."""
    engine = LLMEngine(EngineConfig(model=str(save_random_model(tmp_path / "model")), dtype="float32", device="cpu",
                                    max_model_len=256, num_gpu_blocks_override=32))
    bridge = AsyncEngine(engine)
    params = SamplingParams(max_tokens=4, temperature=0)

    async def main():
        task = asyncio.ensure_future(bridge.add_request("gone", [1, 2, 3], params))
        await asyncio.sleep(0)  # the add is queued; the thread is not running yet
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        bridge.start()
        stream = await bridge.add_request("next", [1, 2, 3], params)
        outputs = [output async for output in stream]  # deltas
        return outputs[-1], sum(len(output.outputs[0].token_ids) for output in outputs)

    try:
        last, num_tokens = asyncio.run(main())
        assert last.finished and num_tokens == 4
        assert bridge.is_alive and not engine.has_unfinished_requests() and engine.stats()["kv_cache_usage"] == 0
    finally:
        bridge.stop()
    assert not bridge.is_alive
