"""The bundled model's RL stage (recipes/glm45-tiny): the reward judges answers against the declared tools as a
client would, and the prompts keep the evaluation's held-out words unseen."""

import re

import pytest
from glm45_tiny.evaluate import NO_TOOL_EXAMPLES
from glm45_tiny.rewards import arguments_fit, tool_use
from glm45_tiny.rl_recipe import RL_NOUNS, RL_VERBS, check_words, prompt_rows
from glm45_tiny.synthetic import _HELDOUT_WORDS, WEATHER_TOOL

from glm45.chat import plan_chat
from glm45.train.rollout import parse_completion

REQUEST = [{"role": "user", "content": "What's the weather in Oslo in Celsius?"}]
CALL = ("\n<think></think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Oslo</arg_value>\n"
        "<arg_key>unit</arg_key>\n<arg_value>celsius</arg_value>\n</tool_call>")
EXPECTED = {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}


def score(text, tools, expected=None, finish="stop", messages=REQUEST):
    prompt = {"messages": messages, "tools": tools, "enable_thinking": True}
    plan = plan_chat(messages, tools, template_kwargs={"enable_thinking": True})
    return tool_use(prompt, parse_completion(text, plan, finish, []), expected_call=expected)


def test_the_reward_grades_calls_against_the_declared_tools():
    tools = [WEATHER_TOOL]
    assert score(CALL, tools, EXPECTED) == 1.0
    assert score(CALL.replace("Oslo", "Bergen"), tools, EXPECTED) == pytest.approx(0.6)  # valid, not copied
    assert score(CALL.replace("celsius", "kelvin"), tools, EXPECTED) == pytest.approx(0.3)  # not in the enum
    assert score(CALL.replace("get_weather", "get_forecast"), tools, EXPECTED) == pytest.approx(0.1)  # undeclared
    assert score("\n<think></think>\nIt is sunny.", tools, EXPECTED) == 0.0  # a call was needed
    assert score(CALL, tools, EXPECTED, finish="length") == 0.0
    assert score("<tool_call>", tools, EXPECTED) == 0.0  # malformed: no thinking block


def test_the_reward_wants_no_call_without_tools():
    assert score("\n<think></think>\nI cannot look up the weather.", None) == 1.0
    assert score(CALL, None) == 0.0
    assert score("\n<think></think>\n", None) == 0.0  # nothing said
    assert not arguments_fit({"city": 3}, WEATHER_TOOL["function"]["parameters"])
    after_result = [*REQUEST, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": EXPECTED}]}, {"role": "tool", "content": '{"temperature": 12}'}]
    prompt = {"messages": after_result, "tools": [WEATHER_TOOL], "enable_thinking": True}
    plan = plan_chat(after_result, [WEATHER_TOOL], template_kwargs={"enable_thinking": True})
    for text, expected in (("\n<think></think>\nIt is 12°C.", 1.0), ("\n<think></think>\nIt is warm.", 0.0)):
        assert tool_use(prompt, parse_completion(text, plan, "stop", []), must_mention=["12"]) == expected


def test_rl_prompts_mix_the_kinds_and_keep_held_out_words_unseen():
    check_words()
    rows = prompt_rows(300, seed=5)
    assert rows == prompt_rows(300, seed=5)
    no_tools = [r for r in rows if r["tools"] is None and not r["kind"].startswith("answer")]
    answers = [r for r in rows if r["kind"].startswith("answer:")]
    assert answers and all(r["messages"][-1]["role"] == "tool" and r["must_mention"] for r in answers)
    english = [r for r in rows if r["expected_call"] and r["expected_call"]["name"].split("_")[0] in RL_VERBS]
    assert 0.2 < len(no_tools) / len(rows) < 0.45 and 0.2 < len(english) / len(rows) < 0.45
    assert all(r["expected_call"] is None for r in no_tools)
    twins = [(r, rows[i + 1]) for i, r in enumerate(rows[:-1]) if r["kind"].startswith("no_tools:")]
    assert twins and all(t["messages"] == r["messages"] and t["tools"] and t["expected_call"] for r, t in twins)
    assert all(r["messages"][-1]["role"] == "user" for r in rows if r not in answers)
    text = " ".join(str(r) for r in rows).lower()
    # No held-out city, verb or noun anywhere as a word of its own ("approved", a status, and made-up words that
    # contain a held-out city's letters are training text too); "_" separates words, as in tool names.
    assert not any(re.search(rf"(?<![a-z]){re.escape(word)}(?![a-z])", text) for word in _HELDOUT_WORDS)
    assert set(RL_NOUNS).isdisjoint(_HELDOUT_WORDS) and len(NO_TOOL_EXAMPLES) == 3
