"""render_chat against the official GLM-4.5 template, byte for byte, plus message validation."""

import ast
import copy
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glm45.chat import GLM45_CHAT_TEMPLATE, render_chat

REFERENCE = Path(__file__).resolve().parents[2] / "shared/reference/glm-4.5"
needs_reference = pytest.mark.skipif(
    not (REFERENCE / "chat_template.jinja").exists(),
    reason=f"reference GLM-4.5 files not found at {REFERENCE}",
)


def _official_template():
    import jinja2.sandbox

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, ensure_ascii=False: json.dumps(x, ensure_ascii=ensure_ascii)
    return env.from_string((REFERENCE / "chat_template.jinja").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def official():
    if not (REFERENCE / "chat_template.jinja").exists():
        pytest.skip(f"reference GLM-4.5 chat template not found at {REFERENCE}")
    template = _official_template()

    def render(messages, tools=None, enable_thinking=True, add_generation_prompt=True):
        return template.render(
            messages=messages,
            tools=tools,
            enable_thinking=enable_thinking,
            add_generation_prompt=add_generation_prompt,
        )

    return render


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "搜索网页 — non-ASCII stays unescaped",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
    },
}
NOW = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}
BARE = {"name": "bare_fn", "description": "a tool given without the OpenAI wrapper", "parameters": {}}


def call(name, arguments, wrapped=True):
    if wrapped:
        return {"id": f"call_{name}", "type": "function", "function": {"name": name, "arguments": arguments}}
    return {"name": name, "arguments": arguments}


# Each case: (messages in the form the template expects, tools, enable_thinking, add_generation_prompt).
CASES = [
    ([{"role": "user", "content": "hi"}], None, True, True),
    ([{"role": "user", "content": "hi"}], None, False, True),
    ([{"role": "user", "content": "hi"}], None, True, False),
    ([{"role": "user", "content": "hi /nothink"}], None, False, True),
    ([{"role": "user", "content": "already/nothink"}], None, False, False),
    ([{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "hi"}], None, True, True),
    ([{"role": "system", "content": ""}, {"role": "user", "content": ""}], None, True, True),
    ([{"role": "user", "content": [{"type": "text", "text": "part one, "}, {"type": "text", "text": "two"}]}],
     None, True, True),
    ([{"role": "user", "content": ["plain string part", {"type": "text", "text": "!"}]}], None, False, True),
    ([{"role": "system", "content": [{"type": "text", "text": "sys parts"}]}, {"role": "user", "content": "q"}],
     None, True, True),
    ([{"role": "user", "content": "Is 17 prime?"}, {"role": "assistant", "content": "Yes."},
      {"role": "user", "content": "18?"}], None, True, True),
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "Answer", "reasoning_content": "abc"}],
     None, True, False),
    # reasoning before the last user turn is dropped
    ([{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1", "reasoning_content": "r1"},
      {"role": "user", "content": "Q2"}], None, True, True),
    # reasoning embedded in content, with the newlines the model writes
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "\n<think>\nthought\n</think>\n\nAnswer\n"}],
     None, True, False),
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>old</think>A"},
      {"role": "user", "content": "Q2"}], None, False, True),
    # content with </think> but no <think>
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "half</think>rest"}], None, True, False),
    # two </think>: the template keeps text after the last one as content
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>a</think>b</think>c"}],
     None, True, False),
    # reasoning_content given as empty string: embedded tags are then kept as content
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>x</think>y", "reasoning_content": ""}],
     None, True, False),
    # whitespace-only reasoning and content
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "  \n", "reasoning_content": " \n "}],
     None, True, False),
    ([{"role": "user", "content": "Q"},
      {"role": "assistant",
       "content": [{"type": "text", "text": "<think>r</think>"}, {"type": "text", "text": "ans"}]}],
     None, True, True),
    # tools, calls with dict arguments of every JSON type, and tool results
    ([{"role": "system", "content": "sys"}, {"role": "user", "content": "weather in 北京?"},
      {"role": "assistant", "content": "I'll check.", "reasoning_content": "need tool",
       "tool_calls": [call("get_weather", {"city": "北京", "days": 3})]},
      {"role": "tool", "content": '{"temp": 26}'}, {"role": "tool", "content": "second"}],
     [WEATHER], True, True),
    ([{"role": "user", "content": "go"},
      {"role": "assistant", "content": "",
       "tool_calls": [call("search", {"q": "  spaced  ", "n": 2.5, "flag": True, "none": None,
                                      "list": [1, "二", {"k": False}], "obj": {"a": {"b": []}}}),
                      call("now", {}, wrapped=False)]},
      {"role": "tool", "content": "r1"}, {"role": "tool", "content": "r2"},
      {"role": "assistant", "content": "done"}],
     [SEARCH, NOW], True, True),
    ([{"role": "user", "content": "go"},
      {"role": "assistant", "content": "", "tool_calls": [call("now", {})]},
      {"role": "tool", "content": ["result A", {"output": "result B"}]},
      {"role": "tool", "content": "C"}],
     [NOW], True, True),
    ([{"role": "user", "content": "go"},
      {"role": "assistant", "content": "", "tool_calls": [call("now", {})]},
      {"role": "tool", "content": "first"},
      {"role": "tool", "content": [{"output": "list after a string result"}]}],
     [NOW], False, True),
    # a tool loop spanning turns: reasoning kept for every assistant turn after the last user message
    ([{"role": "user", "content": "plan"},
      {"role": "assistant", "content": "step 1", "reasoning_content": "t1", "tool_calls": [call("now", {})]},
      {"role": "tool", "content": "12:00"},
      {"role": "assistant", "content": "\n<think>t2</think>\nstep 2", "tool_calls": [call("now", {})]},
      {"role": "tool", "content": "12:01"}],
     [NOW], True, True),
    ([{"role": "user", "content": "plan"},
      {"role": "assistant", "content": "step 1", "reasoning_content": "t1", "tool_calls": [call("now", {})]},
      {"role": "tool", "content": "12:00"},
      {"role": "user", "content": "and now?"}],
     [NOW], False, True),
    ([{"role": "user", "content": "x"}], [BARE, WEATHER], True, True),
    ([{"role": "user", "content": "x"}], [], True, True),
    ([{"role": "assistant", "content": "assistant first, no user at all", "reasoning_content": "kept"}],
     None, True, True),
    ([{"role": "system", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"},
      {"role": "system", "content": "mid-conversation system"}, {"role": "user", "content": "d"}],
     None, False, False),
    ([{"role": "user", "content": "values with markup"},
      {"role": "assistant", "content": "ok",
       "tool_calls": [call("search", {"q": "a < b && c > d\n\"quoted\" </arg_value>"})]}],
     [SEARCH], True, False),
    ([], None, True, True),
    ([], [WEATHER], False, True),
]


@needs_reference
@pytest.mark.parametrize("messages,tools,enable_thinking,add_generation_prompt", CASES)
def test_hand_written_cases_match_official_template(official, messages, tools, enable_thinking,
                                                     add_generation_prompt):
    expected = official(copy.deepcopy(messages), tools, enable_thinking, add_generation_prompt)
    got = render_chat(messages, tools, enable_thinking=enable_thinking, add_generation_prompt=add_generation_prompt)
    assert got == expected
    with_jinja = render_chat(messages, tools, enable_thinking, add_generation_prompt, chat_template=GLM45_CHAT_TEMPLATE)
    assert with_jinja == expected


def test_case_corpus_covers_every_branch():
    assert len(CASES) >= 30
    flat = json.dumps(CASES, ensure_ascii=False)
    for needle in ('"reasoning_content"', '"tool_calls"', '"output"', '"type": "text"', "/nothink", "</think>"):
        assert needle in flat
    assert any(not c[2] for c in CASES) and any(not c[3] for c in CASES)


@needs_reference
def test_builtin_template_is_the_reference_file():
    assert GLM45_CHAT_TEMPLATE == (REFERENCE / "chat_template.jinja").read_text(encoding="utf-8")


@needs_reference
def test_rendered_examples_file():
    lines = (REFERENCE / "rendered_examples.txt").read_text(encoding="utf-8").splitlines()
    examples = [ast.literal_eval(line) for line in lines if line.startswith("'")]
    conversations = [
        dict(messages=[{"role": "system", "content": "你是一名运行于VSCode环境中的专业软件开发助理。"},
                       {"role": "user", "content": "我买的莲藕里面为什么有孔？"}], enable_thinking=False),
        dict(messages=[{"role": "user", "content": "hi"}]),
        dict(messages=CASES[20][0], tools=[WEATHER]),
        dict(messages=[{"role": "user", "content": "Is 17 prime?"}, {"role": "assistant", "content": "Yes."},
                       {"role": "user", "content": "18?"}]),
        dict(messages=[{"role": "user", "content": "Q"},
                       {"role": "assistant", "content": "Answer", "reasoning_content": "abc"}],
             add_generation_prompt=False),
    ]
    assert len(examples) == len(conversations)
    for example, kwargs in zip(examples, conversations, strict=True):
        assert render_chat(**kwargs) == example
    raw_block = "\n".join(lines[2:lines.index(next(x for x in lines[2:] if x.startswith("'")))])
    assert raw_block == examples[2]


# ---------------------------------------------------------------------------------------------------
# Generated conversations

PIECES = ["a", "hello", " ", "  ", "\n", "\n\n", "\t", "北京", "😀", "é", "<think>", "</think>", "/nothink",
          "<tool_call>", "<", ">", '"', "'", "{}", "\\", "None"]
texts = st.lists(st.sampled_from(PIECES), max_size=6).map("".join)
content_parts = st.lists(texts.map(lambda t: {"type": "text", "text": t}) | texts, max_size=3)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False, allow_infinity=False)
    | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=6,
)
TOOLS = [WEATHER, SEARCH, NOW, BARE]


@st.composite
def conversations(draw):
    """(template-form messages, the same messages as an OpenAI client would send them)."""
    template_form, api_form = [], []

    def add(message, api=None):
        template_form.append(message)
        api_form.append(message if api is None else api)

    if draw(st.booleans()):
        add({"role": "system", "content": draw(texts | content_parts)})
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["user", "user", "assistant", "tools", "system"]))
        if kind in ("user", "system"):
            add({"role": kind, "content": draw(texts | content_parts)})
            continue
        message = {"role": "assistant", "content": draw(texts | content_parts)}
        if draw(st.booleans()):
            message["reasoning_content"] = draw(texts | st.none())
        if kind == "assistant":
            add(message)
            continue
        calls = []
        for _ in range(draw(st.integers(1, 3))):
            name = draw(st.sampled_from(["get_weather", "search", "now", "bare_fn"]))
            arguments = draw(st.dictionaries(texts, json_values, max_size=3))
            calls.append((name, arguments, draw(st.booleans())))
        api = dict(message)
        if draw(st.booleans()):
            message["content"], api["content"] = "", None
        message["tool_calls"] = [call(n, a, w) for n, a, w in calls]
        api["tool_calls"] = [call(n, json.dumps(a, ensure_ascii=draw(st.booleans())), w) for n, a, w in calls]
        add(message, api)
        for _ in range(draw(st.integers(1, 3))):
            results = st.lists(texts | texts.map(lambda t: {"output": t}), min_size=1, max_size=2)
            add({"role": "tool", "content": draw(texts | results)})
    return template_form, api_form


@needs_reference
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    conversation=conversations(),
    tools=st.none() | st.lists(st.sampled_from(TOOLS), max_size=3),
    enable_thinking=st.booleans(),
    add_generation_prompt=st.booleans(),
)
def test_generated_conversations_match_official_template(official, conversation, tools, enable_thinking,
                                                         add_generation_prompt):
    template_form, api_form = conversation
    expected = official(copy.deepcopy(template_form), tools, enable_thinking, add_generation_prompt)
    assert render_chat(api_form, tools, enable_thinking, add_generation_prompt) == expected
    assert render_chat(template_form, tools, enable_thinking, add_generation_prompt) == expected


# ---------------------------------------------------------------------------------------------------
# Normalisation that departs from the raw template on purpose, and validation


def test_assistant_content_none_renders_as_empty_not_the_word_none():
    messages = [{"role": "user", "content": "t?"},
                {"role": "assistant", "content": None, "tool_calls": [call("now", "{}")]},
                {"role": "tool", "content": "12:00"}]
    prompt = render_chat(messages, [NOW])
    assert "None" not in prompt
    assert prompt.endswith("<|assistant|>\n<think></think>\n<tool_call>now\n</tool_call>"
                           "<|observation|>\n<tool_response>\n12:00\n</tool_response><|assistant|>")


def test_tool_result_given_as_openai_text_parts_is_one_response():
    messages = [{"role": "user", "content": "t?"},
                {"role": "assistant", "content": "", "tool_calls": [call("now", {})]},
                {"role": "tool", "content": [{"type": "text", "text": "12:"}, {"type": "text", "text": "00"}]}]
    assert render_chat(messages).endswith("<|observation|>\n<tool_response>\n12:00\n</tool_response><|assistant|>")


def test_empty_or_missing_arguments_mean_no_arguments():
    for arguments in ("", None, "{}", {}):
        messages = [{"role": "user", "content": "t?"},
                    {"role": "assistant", "content": "", "tool_calls": [call("now", arguments)]}]
        assert render_chat(messages, add_generation_prompt=False).endswith("<tool_call>now\n</tool_call>")


def test_input_messages_are_not_modified():
    messages = [{"role": "user", "content": "t?"},
                {"role": "assistant", "content": None, "tool_calls": [call("get_weather", '{"city": "x"}')]}]
    before = copy.deepcopy(messages)
    render_chat(messages)
    assert messages == before


USER = {"role": "user", "content": "hi"}


@pytest.mark.parametrize(
    "messages,match",
    [
        ([USER, {"role": "robot", "content": "x"}], r"messages\[1\] has role 'robot'.*allowed roles"),
        ([{"content": "x"}], r"messages\[0\] has role None"),
        (["hi"], r"messages\[0\] must be a dict"),
        ([{"role": "user"}], r"messages\[0\] \(user\) has no content"),
        ([{"role": "system", "content": None}], r"messages\[0\] \(system\) has no content"),
        ([{"role": "user", "content": 5}], r"messages\[0\] \(user\) content is a int"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
         r"messages\[0\] \(user\) content part 0 has type 'image_url'"),
        ([{"role": "user", "content": [{"type": "text"}]}], r"content part 0 is a text part without"),
        ([USER, {"role": "assistant", "content": None}], r"messages\[1\] \(assistant\) has no content and no"),
        ([USER, {"role": "assistant", "content": "", "tool_calls": [call("f", "[1, 2]")]}],
         r"messages\[1\] \(assistant\) tool_calls\[0\] arguments must be a JSON object"),
        ([USER, {"role": "assistant", "content": "", "tool_calls": [call("f", "{not json")]}],
         r"messages\[1\] \(assistant\) tool_calls\[0\] arguments are not valid JSON"),
        ([USER, {"role": "assistant", "content": "", "tool_calls": [call("f", 3)]}],
         r"tool_calls\[0\] arguments must be a JSON object"),
        ([USER, {"role": "assistant", "content": "", "tool_calls": [call("", {})]}],
         r"tool_calls\[0\] has no function name"),
        ([USER, {"role": "assistant", "content": "", "tool_calls": [{"arguments": {}}]}],
         r"tool_calls\[0\] has no function name"),
        ([USER, {"role": "assistant", "content": "", "tool_calls": {"name": "f"}}], r"tool_calls must be a list"),
        ([USER, {"role": "assistant", "content": "", "tool_calls": [call("f", {1: 2})]}],
         r"argument names must be strings"),
        ([USER, {"role": "assistant", "content": "x", "reasoning_content": 7}], r"reasoning_content is a int"),
        ([USER, {"role": "tool", "content": "orphan"}], r"messages\[1\] is a tool result with no preceding"),
        ([{"role": "tool", "content": "first"}], r"messages\[0\] is a tool result"),
        ([USER, {"role": "assistant", "content": "no calls"}, {"role": "tool", "content": "r"}],
         r"messages\[2\] is a tool result"),
        ([USER, {"role": "assistant", "content": "", "tool_calls": [call("f", {})]}, {"role": "tool"}],
         r"messages\[2\] \(tool\) content must be"),
        ([USER, {"role": "assistant", "content": "", "tool_calls": [call("f", {})]},
          {"role": "tool", "content": [{"output": 3}]}], r"messages\[2\] \(tool\) content item 0"),
    ],
)
def test_invalid_messages_raise_value_error_naming_the_message(messages, match):
    with pytest.raises(ValueError, match=match):
        render_chat(messages)


@pytest.mark.parametrize(
    "tools,match",
    [
        ({"type": "function"}, r"tools must be a list"),
        ([{"type": "function", "function": {"description": "no name"}}], r"tools\[0\] must be"),
        (["get_weather"], r"tools\[0\] must be"),
        ([{"name": "f", "parameters": {"default": object()}}], r"tools\[0\] is not JSON-serialisable"),
    ],
)
def test_invalid_tools_raise_value_error(tools, match):
    with pytest.raises(ValueError, match=match):
        render_chat([USER], tools)


def test_messages_must_be_a_list():
    with pytest.raises(ValueError, match="messages must be a list"):
        render_chat("hi")


def test_custom_chat_template_is_rendered_with_jinja():
    template = (
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}"
        "{% for tc in m.tool_calls or [] %}{{ tc.function.arguments | tojson(ensure_ascii=True) }}{% endfor %}"
        "{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    )
    messages = [USER, {"role": "assistant", "content": None, "tool_calls": [call("f", '{"城": 1}')]}]
    assert render_chat(messages, chat_template=template) == '[user]hi[assistant]{"\\u57ce": 1}>'
    with pytest.raises(ValueError, match="chat template error: nope"):
        render_chat([USER], chat_template="{{ raise_exception('nope') }}")
    with pytest.raises(ValueError, match="does not parse"):
        render_chat([USER], chat_template="{% if %}")
