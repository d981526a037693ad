"""The engine with a tokenizer: text prompts, stop strings across token boundaries, chat parsing — and the
statistics of speculative rejection sampling."""

import json

import pytest
from server_helpers import save_random_model

from glm45 import LLM, SamplingParams


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A random tiny model whose vocabulary is a tiny GLM-4.5-style tokenizer's."""
    return save_random_model(tmp_path_factory.mktemp("text_model"))


def test_text_prompt_and_stop_string_across_tokens(text_model):
    llm = LLM(str(text_model), dtype="float32", device="cpu", max_model_len=1024, num_gpu_blocks_override=64)
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    full = llm.generate("The quick brown fox", greedy, use_tqdm=False)[0].outputs[0]
    assert full.text == llm.tokenizer.decode(full.token_ids)
    assert len(full.text) > 12
    # A stop string that starts inside one token and ends inside a later one.
    boundaries = {len(llm.tokenizer.decode(full.token_ids[:i])) for i in range(len(full.token_ids) + 1)}
    start = next(i for i in range(3, len(full.text) - 6) if i not in boundaries)
    stop = full.text[start:start + 6]
    first = full.text.find(stop)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop])
    stopped = llm.generate("The quick brown fox", params, use_tqdm=False)[0].outputs[0]
    assert stopped.text == full.text[:first]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop
    kept = llm.generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                               stop=[stop], include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == full.text[: first + len(stop)]


def test_chat_renders_and_parses(text_model):
    llm = LLM(str(text_model), dtype="float32", device="cpu", max_model_len=1024, num_gpu_blocks_override=64)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    messages = [{"role": "user", "content": "weather in Paris?"}]
    results = llm.chat(messages, SamplingParams(temperature=0, max_tokens=30), tools=tools, use_tqdm=False)
    assert len(results) == 1
    result = results[0]
    completion = result.output.outputs[0]
    from glm45.parsers import parse_chat_output

    expected = parse_chat_output(completion.text, tools)
    assert (result.reasoning_content, result.content, result.tool_calls) == (
        expected.reasoning, expected.content, expected.tool_calls)
    from glm45.chat import render_chat

    assert result.output.prompt == render_chat(messages, tools=tools)
    two = llm.chat([messages, messages], SamplingParams(temperature=0, max_tokens=5), enable_thinking=False,
                   use_tqdm=False)
    assert len(two) == 2 and two[0].output.prompt.endswith("<think></think>")
    json.dumps([r.tool_calls for r in two])
