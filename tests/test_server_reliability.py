"""The server under hostile or failing input: every field that scales work is bounded (a 400 naming it), input
that cannot be used is refused before generation, nothing heavy runs on the event loop, a slow reader holds
back only its own request, failures end a stream with an error event and `[DONE]` and stay with the request
they concern, an incomplete body times out, and the engine is idle after each."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_helpers import WEATHER_TOOL, ServerThread, save_random_model

from glm45.config import EngineConfig
from glm45.engine import LLMEngine, SamplingParams
from glm45.server import limits
from glm45.server.app import error_response
from glm45.server.async_engine import MAX_PENDING_OUTPUTS, AsyncEngine
from glm45.server.config import ServerConfig

USER = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return save_random_model(tmp_path_factory.mktemp("random_model"))


@pytest.fixture(scope="module")
def server(model_folder):
    with ServerThread(model_folder, ServerConfig(request_body_timeout=1.0), max_model_len=256) as server:
        yield server


def post(server, path: str, body, timeout: float = 60) -> tuple[int, object]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(server.url + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def sse_events(text: str) -> list:
    return [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]


def wait_idle(server, timeout: float = 20) -> None:
    """The engine ends idle: nothing running or waiting, every KV block free (aborts land asynchronously)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = server.engine.stats()
        if (stats["num_running"], stats["num_waiting"], stats["kv_cache_usage"]) == (0, 0, 0.0) \
                and not server.engine.has_unfinished_requests():
            return
        time.sleep(0.05)
    raise AssertionError(f"the engine is not idle: {server.engine.stats()}")


def assert_400(result, param: str, *words: str) -> None:
    status, body = result
    assert status == 400, body
    assert body["error"]["param"] == param, body
    for word in words:
        assert word in body["error"]["message"], body


def chat(**fields) -> dict:
    return {"messages": USER, "max_tokens": 4, **fields}


def deep_list(depth: int):
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_every_field_that_scales_work_is_bounded(server):
    cases = [
        (chat(stop=["x"] * (limits.MAX_STOP_STRINGS + 1)), "stop", str(limits.MAX_STOP_STRINGS)),
        (chat(stop=["y" * (limits.MAX_STOP_BYTES // 2 + 1)] * 2), "stop", "bytes"),
        (chat(stop_token_ids=[5] * (limits.MAX_STOP_TOKEN_IDS + 1)), "stop_token_ids", "at most"),
        (chat(logit_bias={str(i): 1 for i in range(limits.MAX_LOGIT_BIAS + 1)}), "logit_bias", "at most"),
        (chat(seed=2**63), "seed", "less than or equal"),
        (chat(seed=-(2**63) - 1), "seed", "greater than or equal"),
        (chat(tools=[WEATHER_TOOL] * (limits.MAX_TOOLS + 1)), "tools", "at most"),
        (chat(tools=[{"type": "function", "function": {"name": "f", "description": "d" * limits.MAX_TOOL_BYTES}}]),
         "tools[0]", "bytes"),
        (chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"a": deep_list(40)}}}]),
         "tools[0].function.parameters", "nested deeper than 32"),
        (chat(n=limits.MAX_SEQUENCES + 1), "n", None),
    ]
    for body, param, word in cases:
        assert_400(post(server, "/v1/chat/completions", body), param, *([word] if word else []))
    prompts = [[5, 6, 7]] * 4
    assert_400(post(server, "/v1/completions", {"prompt": prompts, "n": limits.MAX_SEQUENCES // 4 + 1}), "prompt",
               "sequences")
    assert_400(post(server, "/v1/completions", {"prompt": [5, 6], "n": 2, "stop": ["z"] * 100}), "stop")
    wait_idle(server)


def test_unusable_input_is_a_400_before_generation(server):
    type_5 = {"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}
    named = {"type": "function", "function": {"name": "f"}}
    for stream in (False, True):
        assert_400(post(server, "/v1/chat/completions", chat(tools=[type_5], tool_choice=named, stream=stream)),
                   "tools[0].function.parameters", "not a valid JSON Schema")
    surrogate = b'{"messages": [{"role": "user", "content": "\\ud800"}]}'
    assert_400(post(server, "/v1/chat/completions", surrogate), "messages.0.content", "surrogate")
    in_model = b'{"model": "\\udfff", "messages": [{"role": "user", "content": "x"}]}'
    assert_400(post(server, "/v1/chat/completions", in_model), "model", "surrogate")
    in_key = b'{"prompt": "x", "chat_template_kwargs": {"\\ud800": 1}}'
    assert_400(post(server, "/tokenize", in_key), "chat_template_kwargs", "surrogate")
    assert_400(post(server, "/v1/completions", b'{"prompt": ["ok", "\\udc00"]}'), "prompt.1", "surrogate")
    deep = (b'{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": '
            b'"f", "parameters": {"a": ' + b"[" * 955 + b"]" * 955 + b"}}}]}")
    assert_400(post(server, "/v1/chat/completions", deep), "tools.0.function.parameters.a.0.… (64 levels)",
               "nested deeper than 64")
    assert_400(post(server, "/v1/chat/completions", chat(max_completion_tokens=0)), "max_completion_tokens")
    assert_400(post(server, "/v1/chat/completions", chat(max_tokens=0)), "max_tokens")
    assert_400(post(server, "/tokenize", {"messages": USER, "chat_template_kwargs": {"enable_thinking": "no"}}),
               "chat_template_kwargs", "true or false")
    # A valid pair of surrogates is one character, not an error.
    status, body = post(server, "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}]'
                        b', "max_tokens": 2}')
    assert status == 200, body
    wait_idle(server)


def test_the_error_handler_cannot_fail():
    response = error_response(404, "The model `\udfff` does not exist", param="mod\ud800el")
    body = json.loads(response.body)
    assert body["error"]["message"] == "The model `\\udfff` does not exist" and body["error"]["param"] == "mod\\ud800el"


def test_the_top_seed_with_n_2_runs_and_leaves_the_engine_idle(server):
    status, body = post(server, "/v1/chat/completions", chat(n=2, seed=2**63 - 1, temperature=1.0))
    assert status == 200 and len(body["choices"]) == 2, body
    wait_idle(server)


def test_a_prompt_too_long_by_its_length_is_refused_before_tokenizing(server, monkeypatch):
    tokenizer = server.engine.tokenizer
    calls = []
    encode = tokenizer.encode

    def recording_encode(text):
        calls.append(threading.current_thread())
        return encode(text)

    monkeypatch.setattr(tokenizer, "encode", recording_encode)
    too_long = "a" * (256 * tokenizer.max_token_bytes)
    assert_400(post(server, "/v1/completions", {"prompt": too_long}), "prompt", "at least 256 tokens")
    assert_400(post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": too_long}]}),
               "messages", "at least")
    assert_400(post(server, "/tokenize", {"prompt": too_long}), "prompt", "at least")
    assert calls == []
    status, body = post(server, "/v1/completions", {"prompt": "a short one", "max_tokens": 2})
    assert status == 200, body
    assert calls and all(thread is not server.thread for thread in calls)  # tokenized off the event loop


def test_detokenizing_runs_off_the_event_loop(server, monkeypatch):
    tokenizer = server.engine.tokenizer
    threads = []
    decode = tokenizer.decode

    def recording_decode(ids, **kwargs):
        threads.append(threading.current_thread())
        return decode(ids, **kwargs)

    monkeypatch.setattr(tokenizer, "decode", recording_decode)
    status, body = post(server, "/detokenize", {"tokens": tokenizer.encode("hello there") * 1000})
    assert status == 200 and body["prompt"].startswith("hello there")
    assert threads and all(thread is not server.thread for thread in threads)
    assert_400(post(server, "/detokenize", {"tokens": [5, -1]}), "tokens", "outside the vocabulary")


def test_the_length_bound_holds_for_byte_level_bpe(server):
    tokenizer = server.engine.tokenizer
    per_token = tokenizer.max_token_bytes
    samples = ["a" * 5000, " " * 3000, "北京" * 700, "🙂x" * 900, "<|user|>" * 300, "\n\n\t" * 800,
               "".join(chr(c) for c in range(32, 3000))]
    for text in samples:
        assert len(tokenizer.encode(text)) >= -(-len(text.encode("utf-8")) // per_token)


def test_a_slow_reader_pauses_its_own_request_only(model_folder):
    engine = LLMEngine(EngineConfig(model=str(model_folder), dtype="float32", device="cpu", max_model_len=512,
                                    num_gpu_blocks_override=64))
    bridge = AsyncEngine(engine)
    params = SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)

    async def main():
        bridge.start()
        slow = await bridge.add_request("slow", [5, 6, 7], params)
        fast = await bridge.add_request("fast", [5, 6, 7], params)
        fast_tokens = 0
        async for output in fast:  # runs to the end while "slow" is not read
            fast_tokens += len(output.outputs[0].token_ids)
        await asyncio.sleep(0.2)
        seq = engine.requests["slow"][0]
        paused_at = seq.num_output_tokens
        assert seq.seq_id in engine.scheduler.paused and slow.pending <= MAX_PENDING_OUTPUTS
        await asyncio.sleep(0.2)
        assert seq.num_output_tokens == paused_at < 300  # it waits for its reader
        slow_tokens = 0
        async for output in slow:
            slow_tokens += len(output.outputs[0].token_ids)
        return fast_tokens, slow_tokens

    try:
        assert asyncio.run(main()) == (300, 300)
        assert engine.stats()["kv_cache_usage"] == 0 and not engine.has_unfinished_requests()
    finally:
        bridge.stop()


@pytest.fixture(scope="module")
def one_at_a_time_server(model_folder):
    """A server whose steps run one sequence: a request is never in the step of another."""
    with ServerThread(model_folder, max_model_len=256, max_num_seqs=1) as server:
        yield server


def test_a_failing_step_ends_its_stream_with_an_error_event_and_others_go_on(one_at_a_time_server, monkeypatch):
    server = one_at_a_time_server
    runner, scheduler = server.engine.runner, server.engine.scheduler

    def failing(original):  # fails the step of the request with token 77 once another request waits
        def step(*args):
            if scheduler.running and 77 in scheduler.running[0].token_ids[:3]:
                if scheduler.waiting:
                    raise RuntimeError("injected model failure")
                time.sleep(0.02)  # its 200 tokens must outlast the healthy request's arrival, however fast a step is
            return original(*args)
        return step

    for name in ("forward", "decode_steps"):  # a step of its own, and a run of decode steps
        monkeypatch.setattr(runner, name, failing(getattr(runner, name)))
    results = {}

    def run(name, body):
        results[name] = post(server, "/v1/completions", body)

    healthy = {"prompt": [5, 6, 7], "max_tokens": 40, "ignore_eos": True, "stream": True}
    doomed = threading.Thread(target=run, args=("doomed", {**healthy, "prompt": [5, 77, 7], "max_tokens": 200}))
    doomed.start()
    deadline = time.monotonic() + 30
    while not scheduler.running and time.monotonic() < deadline:
        time.sleep(0.01)
    run("healthy", healthy)  # waits in the engine (one sequence per step) while the other one fails
    doomed.join(60)
    status, text = results["doomed"]
    events = sse_events(text)
    assert status == 200 and events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "injected model failure" in error["message"]
    status, text = results["healthy"]
    events = sse_events(text)
    assert status == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    status, body = post(server, "/v1/completions", {"prompt": [5, 6], "max_tokens": 2})  # later requests run
    assert status == 200, body
    wait_idle(server)


def test_a_failure_in_a_stream_handler_fails_that_request_only(server, monkeypatch):
    from glm45.chat.turn import AssistantTurn

    feed = AssistantTurn.feed

    def broken_feed(self, text):
        if self.single_call:  # only requests with parallel_tool_calls=false
            raise KeyError("injected handler failure")
        return feed(self, text)

    monkeypatch.setattr(AssistantTurn, "feed", broken_feed)
    status, text = post(server, "/v1/chat/completions", chat(stream=True, parallel_tool_calls=False))
    events = sse_events(text)
    assert status == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["message"] == "internal server error: KeyError"
    status, body = post(server, "/v1/chat/completions", chat(parallel_tool_calls=False))
    assert status == 500 and body["error"]["type"] == "server_error"
    status, body = post(server, "/v1/chat/completions", chat())
    assert status == 200, body
    wait_idle(server)


def test_a_body_shorter_than_its_content_length_times_out(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        started = time.monotonic()
        reply = b""
        while b"request_timeout" not in reply and (piece := sock.recv(4096)):
            reply += piece
    assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply
    assert time.monotonic() - started < 10


def _success(server) -> dict[str, float]:
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return {s.labels["finished_reason"]: s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "glm45:request_success_total"}


def test_request_success_counts_each_completion_of_finished_and_aborted_requests(server):
    before = _success(server)
    status, _ = post(server, "/v1/completions", {"prompt": [5, 6], "max_tokens": 2, "n": 3, "ignore_eos": True})
    assert status == 200
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        body = json.dumps({"prompt": [5, 6], "max_tokens": 200, "n": 3, "ignore_eos": True,
                           "stream": True}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    wait_idle(server)
    after = _success(server)
    assert after.get("length", 0) - before.get("length", 0) == 3
    assert after.get("abort", 0) - before.get("abort", 0) == 3
