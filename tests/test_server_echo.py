"""The completions contract of log-likelihood evaluators, end to end with the official `openai` client on the bundled
model: `echo` with `logprobs` covers the prompt's tokens then the generated ones, `max_tokens: 0` scores the prompt
only, streaming agrees with the whole response, and vLLM's `prompt_logprobs` field on completions and chat. The
server prefills in 16-token chunks, so the prompt's log-probabilities arrive in parts."""

from __future__ import annotations

import math

import openai
import pytest
import torch
from server_helpers import ServerThread
from test_server import http

from glm45.config import bundled_model_path

PROMPT = "[gMASK]<sop><|user|>\nWhat is the weather like in Paris today?<|assistant|>\n<think>"
OTHER = "The capital of France is Paris, and the capital of Italy is Rome."
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def server():
    with ServerThread(bundled_model_path(), max_num_batched_tokens=16) as running:
        yield running


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def tokenize(server, text: str) -> list[int]:
    return http(server, "POST", "/tokenize", {"prompt": text})[1]["tokens"]


def reference(server, ids: list[int]) -> torch.Tensor:
    """Float32 log_softmax of one uncached forward: row p is the distribution of token p + 1."""
    with torch.no_grad():
        return server.engine.model(torch.tensor([ids]))[0].float().log_softmax(-1)


def streamed(chunks) -> dict[int, dict]:
    """Per choice: the joined text and logprobs fields of a completions stream, and its finish reason."""
    out: dict[int, dict] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            slot = out.setdefault(choice.index, {"text": "", "tokens": [], "token_logprobs": [], "top_logprobs": [],
                                                 "text_offset": [], "finish": None})
            slot["text"] += choice.text
            if choice.logprobs is not None:
                for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                    slot[field] += getattr(choice.logprobs, field)
            slot["finish"] = choice.finish_reason or slot["finish"]
    return out


def assert_same(got: dict[int, dict], expected: dict[int, dict]) -> None:
    """Equal choices, log-probabilities within TOLERANCE (the two runs may batch differently)."""
    assert got.keys() == expected.keys()
    for index, slot in expected.items():
        for field in ("text", "tokens", "text_offset", "finish"):
            assert got[index][field] == slot[field], (index, field)
        assert [v is None for v in got[index]["token_logprobs"]] == [v is None for v in slot["token_logprobs"]]
        for a, b in zip(got[index]["token_logprobs"], slot["token_logprobs"], strict=True):
            assert a is None or abs(a - b) <= TOLERANCE
        for a, b in zip(got[index]["top_logprobs"], slot["top_logprobs"], strict=True):
            assert (a is None) == (b is None) and (a is None or a.keys() == b.keys())
            assert a is None or all(abs(a[t] - b[t]) <= TOLERANCE for t in a)


def whole(choice) -> dict:
    logprobs = choice.logprobs
    return {"text": choice.text, "tokens": logprobs.tokens, "token_logprobs": logprobs.token_logprobs,
            "top_logprobs": logprobs.top_logprobs, "text_offset": logprobs.text_offset,
            "finish": choice.finish_reason}


def test_echo_max_tokens_0_scores_the_prompt(server):
    ids = tokenize(server, PROMPT)
    response = client(server).completions.create(model="tiny", prompt=PROMPT, max_tokens=0, echo=True, logprobs=2)
    choice = response.choices[0]
    assert choice.text == PROMPT == "".join(choice.logprobs.tokens)
    assert choice.finish_reason == "length"
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(ids), 0)
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.text_offset) == len(ids)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
    expected = reference(server, ids)
    worst = max(abs(logprobs.token_logprobs[p] - float(expected[p - 1, ids[p]])) for p in range(1, len(ids)))
    assert worst <= TOLERANCE
    for p in range(1, len(ids)):
        top = logprobs.top_logprobs[p]
        assert 2 <= len(top) <= 3 and top[logprobs.tokens[p]] == logprobs.token_logprobs[p]
        assert max(top.values()) == pytest.approx(float(expected[p - 1].max()), abs=TOLERANCE)


def test_echo_with_generation_is_prompt_then_completion_and_streams_the_same(server):
    c = client(server)
    ids = tokenize(server, PROMPT)
    plain = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=1).choices[0]
    echoed = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=1, echo=True)
    choice = echoed.choices[0]
    assert choice.text.endswith(plain.text) and len(choice.logprobs.tokens) == len(ids) + len(plain.logprobs.tokens)
    assert choice.logprobs.tokens[len(ids):] == plain.logprobs.tokens
    assert choice.logprobs.token_logprobs[len(ids):] == pytest.approx(plain.logprobs.token_logprobs, abs=TOLERANCE)
    assert echoed.usage.completion_tokens == len(plain.logprobs.tokens)
    # Several prompts, n = 2, with and without generation: every stream joins to its whole response.
    for max_tokens in (0, 5):
        request = dict(model="tiny", prompt=[PROMPT, OTHER], max_tokens=max_tokens, temperature=0, logprobs=3,
                       echo=True, n=2)
        response = c.completions.create(**request)
        assert_same(streamed(c.completions.create(**request, stream=True)), {ch.index: whole(ch)
                                                                            for ch in response.choices})


def test_prompt_logprobs_field_on_completions_and_chat(server):
    c = client(server)
    ids = tokenize(server, OTHER)
    response = c.completions.create(model="tiny", prompt=OTHER, max_tokens=1, extra_body={"prompt_logprobs": 2})
    entries = response.choices[0].model_extra["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(ids)
    expected = reference(server, ids)
    for p in range(1, len(ids)):
        entry = {int(t): v for t, v in entries[p].items()}
        assert ids[p] in entry and len(entry) in (2, 3)
        for token, value in entry.items():
            assert value["logprob"] == pytest.approx(float(expected[p - 1, token]), abs=TOLERANCE)
            assert isinstance(value["decoded_token"], str)
        top = expected[p - 1].topk(2).indices.tolist()
        assert [entry[t]["rank"] for t in top] == [1, 2]
    messages = [{"role": "user", "content": "What is 12*7?"}]
    chat = c.chat.completions.create(model="tiny", messages=messages, max_tokens=2, extra_body={"prompt_logprobs": 0})
    chat_entries = chat.model_extra["prompt_logprobs"]
    assert len(chat_entries) == chat.usage.prompt_tokens and chat_entries[0] is None
    assert all(len(entry) == 1 and math.isfinite(next(iter(entry.values()))["logprob"]) for entry in chat_entries[1:])
    assert c.chat.completions.create(model="tiny", messages=messages, max_tokens=2).model_extra.get(
        "prompt_logprobs") is None


def test_echo_and_prompt_logprobs_mistakes_are_400s(server):
    cases = [
        ({"prompt": OTHER, "max_tokens": 0}, "max_tokens", "echo"),
        ({"prompt": OTHER, "max_tokens": 0, "echo": True, "logprobs": 21}, "logprobs", "[0, 20]"),
        ({"prompt": OTHER, "max_tokens": 1, "prompt_logprobs": 21}, "prompt_logprobs", "[0, 20]"),
        ({"prompt": OTHER, "max_tokens": 1, "prompt_logprobs": -1}, "prompt_logprobs", "[0, 20]"),
        ({"prompt": OTHER, "max_tokens": 1, "prompt_logprobs": 1, "stream": True}, "prompt_logprobs", "stream"),
        ({"prompt": OTHER, "max_tokens": -1, "echo": True}, "max_tokens", ""),
    ]
    for body, param, words in cases:
        status, error = http(server, "POST", "/v1/completions", {"model": "tiny", **body})
        assert status == 400 and error["error"]["param"] == param and words in error["error"]["message"], body
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "prompt_logprobs": 30}
    status, error = http(server, "POST", "/v1/chat/completions", chat)
    assert status == 400 and error["error"]["param"] == "prompt_logprobs"
