"""Reasoning and tool-call parsers: one-shot cases, streaming equal to one-shot at any chunking, and the
peers' known failures (reference README) shown not to happen here."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from protocol_fixtures import build_tiny_tokenizer

from glm45.chat import render_chat
from glm45.parsers import (
    ChatOutput,
    ChatOutputParser,
    ContentDelta,
    ReasoningDelta,
    ReasoningParser,
    ToolCallDelta,
    ToolCallParser,
    convert_value,
    parse_chat_output,
    parse_reasoning,
    parse_tool_calls,
)
from glm45.tokenizer import IncrementalDetokenizer

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "unit": {"enum": ["c", "f"]}},
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "parameters": {
            "type": "object",
            "properties": {
                "q": {"type": "string"},
                "limit": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                "filters": {"type": "object"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "exact": {"type": "boolean"},
                "score": {"type": "number"},
                "mixed": {"type": ["integer", "string"]},
            },
        },
    },
}
NOW = {"name": "now", "parameters": {"type": "object", "properties": {}}}  # a bare function, no wrapper
TOOLS = [WEATHER, SEARCH, NOW]


def chunks(text, cuts):
    points = sorted({0, len(text), *(c for c in cuts if 0 <= c <= len(text))})
    return [text[a:b] for a, b in zip(points, points[1:], strict=False)]


def run(parser, pieces):
    events = []
    for piece in pieces:
        events += parser.feed(piece)
    return events + parser.finish()


def collect(events):
    """What a client accumulates from the deltas: (reasoning, content, [{"name", "arguments": str}])."""
    calls = []
    for e in events:
        if isinstance(e, ToolCallDelta):
            if e.name is not None:
                assert e.index == len(calls) and e.id
                calls.append({"name": e.name, "arguments": e.arguments})
            else:
                assert e.index == len(calls) - 1 and e.id is None
                calls[-1]["arguments"] += e.arguments
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    return reasoning or None, content or None, calls


def parsed(calls):
    return [{"name": c["name"], "arguments": json.loads(c["arguments"])} for c in calls]


def all_chunkings(text):
    """Every fixed chunk size from one character to the whole text."""
    for size in range(1, len(text) + 1):
        yield [text[i:i + size] for i in range(0, len(text), size)] or [""]


def examples(n):
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------------------------------------------
# Reasoning

REASONING_CASES = [
    ("<think>R</think>C", "R", "C"),
    ("no tags at all", None, "no tags at all"),
    ("<think></think>C", None, "C"),
    ("\n<think>R</think>\nC", "R", "C"),
    ("<think>\nline 1\n\nline 2\n</think>\n\nC\n", "line 1\n\nline 2", "C\n"),
    ("<think>cut off mid-thought, no clos", "cut off mid-thought, no clos", None),
    ("<think>cut off with a partial tag </thi", "cut off with a partial tag </thi", None),
    ("<think>R</think>", "R", None),
    ("<think>R</think>\n \n", "R", None),
    ("<think>  </think>C", None, "C"),
    ("\nAnswer, as with enable_thinking=False", None, "Answer, as with enable_thinking=False"),
    ("Answer first <think>then a literal tag</think> stays content", None,
     "Answer first <think>then a literal tag</think> stays content"),
    ("</think>x", None, "</think>x"),
    ("<think", None, "<think"),
    ("<thinking>not the tag", None, "<thinking>not the tag"),
    ("  \n<think>after blanks</think>ok", "after blanks", "ok"),
    ("<think>a<think>b</think>c</think>d", "a<think>b", "c</think>d"),
    ("<think>trailing spaces kept  </think>  content keeps its spaces  ", "trailing spaces kept  ",
     "  content keeps its spaces  "),
    ("<think>北京😀</think>\n答案", "北京😀", "答案"),
    ("", None, None),
    (" \n\t", None, None),
]


@pytest.mark.parametrize("text,reasoning,content", REASONING_CASES)
def test_reasoning_one_shot_and_every_chunk_size(text, reasoning, content):
    assert parse_reasoning(text) == (reasoning, content)
    for pieces in all_chunkings(text):
        r, c, calls = collect(run(ReasoningParser(), pieces))
        assert (r, c) == (reasoning, content) and calls == []


def test_reasoning_never_leaks_a_partial_tag():
    parser = ReasoningParser()
    assert parser.feed("\n<thi") == []
    assert parser.feed("nk>step one\n") == [ReasoningDelta("step one")]
    assert parser.feed("</thi") == []
    assert parser.feed("nk>\nAns") == [ContentDelta("Ans")]
    assert parser.feed("wer <") == [ContentDelta("wer <")]  # inside content, tags mean nothing more
    assert parser.finish() == []


REASONING_PIECES = ["<think>", "</think>", "<thi", "</th", "<", ">", "/", "think", "\n", "\n\n", " ", "a", "b c",
                    "北京", "😀", "<tool_call>", "<tool_ca", "ll>"]


@examples(200)
@given(text=st.lists(st.sampled_from(REASONING_PIECES), max_size=12).map("".join), data=st.data())
def test_reasoning_streaming_equals_one_shot_for_any_chunking(text, data):
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=len(text)))
    expected = parse_reasoning(text)
    parser = ReasoningParser()
    reasoning, content = "", ""
    for piece in chunks(text, cuts):
        for e in parser.feed(piece):
            reasoning += e.text if isinstance(e, ReasoningDelta) else ""
            content += e.text if isinstance(e, ContentDelta) else ""
        # Never anything that is later taken back: each stream is a prefix of the final result.
        assert (expected[0] or "").startswith(reasoning) and (expected[1] or "").startswith(content)
    r, c, _ = collect([ReasoningDelta(reasoning), ContentDelta(content), *parser.finish()])
    assert (r, c) == expected


# ---------------------------------------------------------------------------------------------------
# Tool calls: one-shot cases

CALL = ("<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>北京</arg_value>\n"
        "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>")
WEATHER_CALL = {"name": "get_weather", "arguments": {"city": "北京", "days": 3}}

TOOL_CASES = [
    # content before a call is kept as it is, trailing space and newlines included
    ("Let me check. " + CALL, "Let me check. ", [WEATHER_CALL]),
    ("Let me check.\n\n" + CALL, "Let me check.\n\n", [WEATHER_CALL]),
    # whitespace-only content is none
    ("  \n" + CALL + "\n", None, [WEATHER_CALL]),
    # zero-argument calls
    ("<tool_call>now\n</tool_call>", None, [{"name": "now", "arguments": {}}]),
    ("<tool_call>now</tool_call>", None, [{"name": "now", "arguments": {}}]),
    # several calls, content between and after kept; two tags back to back
    (CALL + "between" + CALL + "<tool_call>now\n</tool_call>after", "betweenafter",
     [WEATHER_CALL, WEATHER_CALL, {"name": "now", "arguments": {}}]),
    # unterminated calls and a bare <tool_call> are content
    ("<tool_call>", "<tool_call>", []),
    ("ok <tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Par",
     "ok <tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Par", []),
    (CALL + "<tool_call>now\n", "<tool_call>now\n", [WEATHER_CALL]),
    # unknown names and empty names are content, the whole call text included
    ("<tool_call>launch_rockets\n<arg_key>n</arg_key>\n<arg_value>3</arg_value>\n</tool_call>",
     "<tool_call>launch_rockets\n<arg_key>n</arg_key>\n<arg_value>3</arg_value>\n</tool_call>", []),
    ("<tool_call>\n<arg_key>n</arg_key><arg_value>3</arg_value></tool_call> then " + CALL,
     "<tool_call>\n<arg_key>n</arg_key><arg_value>3</arg_value></tool_call> then ", [WEATHER_CALL]),
    # values keep whitespace, markup, quotes and newlines; non-ASCII is not escaped
    ("<tool_call>search\n<arg_key>q</arg_key>\n<arg_value>  a < b, \"c\" </arg_key>\n\tand\n </arg_value>\n"
     "</tool_call>",
     None, [{"name": "search", "arguments": {"q": '  a < b, "c" </arg_key>\n\tand\n '}}]),
    # typed from the schema
    ("<tool_call>search\n<arg_key>limit</arg_key>\n<arg_value>null</arg_value>\n<arg_key>exact</arg_key>\n"
     "<arg_value>true</arg_value>\n<arg_key>score</arg_key>\n<arg_value>3.14</arg_value>\n"
     "<arg_key>tags</arg_key>\n<arg_value>[\"a\", \"北\"]</arg_value>\n<arg_key>filters</arg_key>\n"
     "<arg_value>{\"site\": \"x.org\", \"n\": [1, {\"d\": null}]}</arg_value>\n<arg_key>mixed</arg_key>\n"
     "<arg_value>42</arg_value>\n<arg_key>q</arg_key>\n<arg_value>42</arg_value>\n</tool_call>",
     None, [{"name": "search", "arguments": {"limit": None, "exact": True, "score": 3.14, "tags": ["a", "北"],
                                             "filters": {"site": "x.org", "n": [1, {"d": None}]}, "mixed": 42,
                                             "q": "42"}}]),
    # tolerated: no newline after the name, stray text, a key without value, a value cut by </tool_call>
    ("<tool_call>get_weather<arg_key>city</arg_key><arg_value>Oslo</arg_value></tool_call>", None,
     [{"name": "get_weather", "arguments": {"city": "Oslo"}}]),
    ("<tool_call>get_weather\nstray<arg_key>x</arg_key>\n<arg_key>city</arg_key>junk<arg_value>Rome</arg_value>"
     " \n<arg_key>days</arg_key>\n<arg_value>2</tool_call>", None,
     [{"name": "get_weather", "arguments": {"city": "Rome", "days": 2}}]),
    ("<tool_call>get_weather\n<arg_key>city</arg_key><arg_value>A</arg_value><arg_key>city</arg_key>"
     "<arg_value>B</arg_value></tool_call>", None, [{"name": "get_weather", "arguments": {"city": "B"}}]),
    # partial tags in plain content are content
    ("a <tool_ca b </tool_call> <arg_key>", "a <tool_ca b </tool_call> <arg_key>", []),
    # a literal two-character \n (backslash, n) where the template has a newline, between any tags
    ("<tool_call>get_weather\\n<arg_key>city</arg_key>\\n<arg_value>Tokyo</arg_value>\\n</tool_call>", None,
     [{"name": "get_weather", "arguments": {"city": "Tokyo"}}]),
    ("<tool_call>now\\n</tool_call>", None, [{"name": "now", "arguments": {}}]),
    # values coerced to the declared type when the text spells it unambiguously
    ("<tool_call>search\n<arg_key>score</arg_key>\n<arg_value>\"42\"</arg_value>\n<arg_key>exact</arg_key>\n"
     "<arg_value>True</arg_value>\n<arg_key>tags</arg_key>\n<arg_value>['a', 'b']</arg_value>\n</tool_call>",
     None, [{"name": "search", "arguments": {"score": 42, "exact": True, "tags": ["a", "b"]}}]),
    # a value whose <arg_value> is missing is read up to its </arg_value>; a key with no value is skipped
    ("<tool_call>get_weather\n<arg_key>city</arg_key>\nOslo</arg_value>\n<arg_key>unit</arg_key>\n"
     "<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n<arg_key>extra</arg_key></tool_call>", None,
     [{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}]),
    # a literal </arg_value> inside a value is data unless <arg_key> or </tool_call> follows it
    ("<tool_call>search\n<arg_key>q</arg_key>\n<arg_value>s.split('</arg_value>')[0]</arg_value>\n"
     "<arg_key>limit</arg_key>\n<arg_value>3</arg_value>\n</tool_call>", None,
     [{"name": "search", "arguments": {"q": "s.split('</arg_value>')[0]", "limit": 3}}]),
    # ... and a literal </tool_call> always ends the call (string values are written unescaped)
    ("<tool_call>search\n<arg_key>q</arg_key>\n<arg_value>a</tool_call>b</arg_value>\n</tool_call>",
     "b</arg_value>\n</tool_call>", [{"name": "search", "arguments": {"q": "a"}}]),
]


@pytest.mark.parametrize("text,content,calls", TOOL_CASES)
def test_tool_calls_one_shot_and_every_chunk_size(text, content, calls):
    assert parse_tool_calls(text, TOOLS) == (content, calls)
    for pieces in all_chunkings(text):
        parser = ToolCallParser(TOOLS)
        r, c, streamed = collect(run(parser, pieces))
        if parser.unterminated:  # the one divergence: a call already announced, then cut off
            assert parsed(streamed[:-1]) == calls and (content or "").startswith(c or "")
            continue
        assert (r, c, parsed(streamed)) == (None, content, calls)


def test_unterminated_call_streams_no_closing_brace():
    text = CALL + "<tool_call>now\n"
    assert parse_tool_calls(text, TOOLS) == ("<tool_call>now\n", [WEATHER_CALL])
    parser = ToolCallParser(TOOLS)
    _, content, calls = collect(run(parser, [text]))
    assert parser.unterminated and content is None
    assert calls[1] == {"name": "now", "arguments": ""} and parsed(calls[:1]) == [WEATHER_CALL]


def test_tools_none_accepts_any_name_and_parses_json_values():
    text = "<tool_call>anything\n<arg_key>a</arg_key><arg_value>[1, 2]</arg_value><arg_key>b</arg_key>" \
           "<arg_value>plain text</arg_value><arg_key>c</arg_key><arg_value> 7 </arg_value></tool_call>"
    expected = [{"name": "anything", "arguments": {"a": [1, 2], "b": "plain text", "c": 7}}]
    assert parse_tool_calls(text) == (None, expected)
    assert parsed(collect(run(ToolCallParser(), list(text)))[2]) == expected
    assert parse_tool_calls(text, []) == (text, [])  # an empty tool list knows no names


@pytest.mark.parametrize(
    "raw,schema,value",
    [
        (" 42 ", {"type": "string"}, " 42 "),
        ("42", {"type": "integer"}, 42),
        ("42", {"type": "number"}, 42),
        ("3.5", {"type": "integer"}, 3.5),  # wrong type but JSON: passed on as JSON
        ("3 days", {"type": "integer"}, "3 days"),  # not JSON: the text
        ("true", {"type": "boolean"}, True),
        ("null", {"type": "null"}, None),
        ("null", {"type": ["string", "null"]}, None),
        ("nil", {"type": ["string", "null"]}, "nil"),
        ("42", {"type": ["integer", "string"]}, 42),
        ("[1]", {"type": ["integer", "string"]}, "[1]"),
        ("5", {"anyOf": [{"type": "integer"}, {"type": "null"}]}, 5),
        ("5", {"anyOf": [{"type": "string"}, {"type": "null"}]}, "5"),
        ("5", {"anyOf": [{"type": "string"}, {}]}, 5),  # an unconstrained alternative
        ("c", {"enum": ["c", "f"]}, "c"),
        ("1", {"enum": ["1", "2"]}, "1"),
        ("2", {"enum": [1, 2]}, 2),
        ('{"a": 1}', {"type": "object"}, {"a": 1}),
        ('"quoted"', None, "quoted"),
        ("NaN", None, "NaN"),
        ("Infinity", {"type": "number"}, "Infinity"),
        ("", {"type": "integer"}, ""),
        ("hello", {"description": "no type"}, "hello"),
        # unambiguous spellings of the declared type
        ('"42"', {"type": "number"}, 42),
        ('"42"', {"type": "integer"}, 42),
        ('"4.5"', {"type": "number"}, 4.5),
        ("3.0", {"type": "integer"}, 3),
        ("3.0", {"type": "number"}, 3.0),
        ('"true"', {"type": "boolean"}, True),
        ("True", {"type": "boolean"}, True),
        ("FALSE", {"type": "boolean"}, False),
        ("None", {"type": "null"}, None),
        ("None", {"type": ["integer", "null"]}, None),
        ('"[1, 2]"', {"type": "array"}, [1, 2]),
        ("['a', None, True]", {"type": "array"}, ["a", None, True]),
        ("{'pattern': '\\d+'}", {"type": "object"}, {"pattern": "\\d+"}),
        ('[{\\"id\\": \\"1\\"}]', {"type": "array"}, [{"id": "1"}]),
        # ... and what is left as written
        ("None", {"type": ["string", "null"]}, "None"),  # may be the string
        ("True", None, "True"),  # no declared type: only JSON is typed
        ("yes", {"type": "boolean"}, "yes"),
        ('"forty"', {"type": "integer"}, "forty"),
        ("(1, 2)", {"type": "array"}, "(1, 2)"),  # a tuple literal is not JSON
        ("{1, 2}", {"type": "array"}, "{1, 2}"),
        ("123_456", {"type": "integer"}, "123_456"),
        ('"42"', {"type": "string"}, '"42"'),  # a string keeps its quotes
    ],
)
def test_convert_value_follows_the_schema(raw, schema, value):
    assert convert_value(raw, schema) == value
    assert type(convert_value(raw, schema)) is type(value)


@pytest.mark.parametrize("tail", ["<arg_key>unit</arg_key>\n</tool_call>", "<arg_key>unit</tool_call>",
                                  "<arg_key>unit</arg_key>\n<arg_key>city</arg_key><arg_value>x</arg_value></tool_call>"])
def test_a_key_without_a_value_is_skipped_with_a_warning(tail, caplog):
    text = "<tool_call>get_weather\n" + tail
    for parse in (lambda: parse_tool_calls(text, TOOLS)[1], lambda: parsed(collect(run(ToolCallParser(TOOLS),
                                                                                         list(text)))[2])):
        caplog.clear()
        calls = parse()
        assert "unit" not in calls[0]["arguments"]
        assert [r.getMessage() for r in caplog.records] == [
            "tool call 'get_weather': argument 'unit' has no <arg_value>; skipped"]


def test_streamed_arguments_are_json_dumps_of_the_arguments():
    text = TOOL_CASES[12][0]
    args = parse_tool_calls(text, TOOLS)[1][0]["arguments"]
    for pieces in (list(text), [text]):
        streamed = collect(run(ToolCallParser(TOOLS), pieces))[2][0]["arguments"]
        assert streamed == json.dumps(args, ensure_ascii=False)
        assert "北" in streamed  # not escaped


def test_tool_call_delta_openai_shape():
    parser = ToolCallParser(TOOLS, new_call_id=lambda: "call_1")
    events = run(parser, [CALL])
    # Fed at once, the name and all argument fragments merge into one delta.
    assert [e.to_openai() for e in events] == [
        {"index": 0, "id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "北京", "days": 3}'}},
    ]
    later = ToolCallParser(TOOLS, new_call_id=lambda: "call_2")
    later.feed("<tool_call>now\n")
    assert [e.to_openai() for e in later.feed("</tool_call>")] == [{"index": 0, "function": {"arguments": "{}"}}]


def test_name_is_sent_as_soon_as_complete_and_the_brace_only_at_the_end():
    parser = ToolCallParser(TOOLS, new_call_id=lambda: "id")
    assert parser.feed("Sure.<tool_call>get_wea") == [ContentDelta("Sure.")]
    assert parser.feed("ther") == []
    assert parser.feed("\n") == [ToolCallDelta(0, "", id="id", name="get_weather")]
    events = parser.feed("<arg_key>city</arg_key>\n<arg_value>Ber")
    assert events == [ToolCallDelta(0, '{"city": "Ber')]
    assert parser.feed("lin</arg_val") == [ToolCallDelta(0, "lin")]  # the tag prefix is held back
    # "</arg_value>" closes the value only if "<arg_key>" or "</tool_call>" follows: held until known.
    assert parser.feed("ue>\n</tool_ca") == []
    assert parser.unterminated
    assert parser.feed("ll>") == [ToolCallDelta(0, '"}')]
    assert not parser.unterminated and parser.finish() == []


# ---------------------------------------------------------------------------------------------------
# Tool calls: generated outputs, any chunking

texts = st.lists(st.sampled_from(["a", " ", "\n", "北京", "😀", '"', "\\", "<", ">", "/", "{", "}", "x y",
                                  "<tool_ca", "tool_call>", "</arg_key>", "<arg_value>", "<think>", "\t",
                                  "</arg_value>", "\\n", "</arg_val"]),
                 max_size=6).map("".join)
VALUES = {
    "city": texts, "q": texts,
    "days": st.integers(-5, 10**6).map(str) | st.sampled_from([" 7\n", "3 days", '"7"', "7.0"]),
    "unit": st.sampled_from(["c", "f", "k"]),
    "limit": st.sampled_from(["null", "10", "ten", "None"]),
    "filters": st.dictionaries(texts, st.integers() | texts, max_size=2).map(
        lambda d: json.dumps(d, ensure_ascii=False)) | st.sampled_from(["{'k': None}", '{\\"k\\": 1}']),
    "tags": st.lists(texts, max_size=3).map(json.dumps) | st.lists(texts, max_size=2).map(repr),
    "exact": st.sampled_from(["true", "false", "yes", "True", '"false"']),
    "score": st.floats(allow_nan=False, allow_infinity=False).map(repr),
    "mixed": st.sampled_from(["1", "one", "[1]"]),
    "extra": texts | st.sampled_from(["42", "[1, 2]", '{"k": null}', "true"]),
}
PARAMS = {"get_weather": ["city", "days", "unit", "extra"], "search": [p for p in VALUES if p not in ("city",)],
          "now": ["extra"]}


@st.composite
def tool_calls(draw):
    name = draw(st.sampled_from(["get_weather", "search", "now", "now", "unknown_tool"]))
    keys = draw(st.lists(st.sampled_from(PARAMS.get(name, ["extra"])), max_size=4))
    sep = draw(st.sampled_from(["\n", "\n", "", " \n", "\\n"]))
    pairs = []
    for key in keys:
        value, gap = draw(VALUES[key]), draw(st.sampled_from(["\n", "", "\\n"]))
        # Sometimes malformed: no <arg_value> (vllm#49248), or no value at all.
        opening = draw(st.sampled_from(["<arg_value>", "<arg_value>", "<arg_value>", ""]))
        value_text = draw(st.sampled_from([f"{opening}{value}</arg_value>"] * 5 + [""]))
        pairs.append(f"<arg_key>{key}</arg_key>{gap}{value_text}")
        pairs.append(draw(st.sampled_from(["\n", "\n", "", "\\n", "junk"])))
    return f"<tool_call>{name}{sep}{''.join(pairs)}</tool_call>"


TAILS = ["", "", "<tool_call>", "<tool_call>get_wea", "<tool_call>unknown_tool\n<arg_key>a</arg_key>", "<tool_ca"]
model_outputs = st.tuples(
    st.lists(st.tuples(texts, tool_calls()), max_size=3), texts, st.sampled_from(TAILS)
).map(lambda t: "".join(c + call for c, call in t[0]) + t[1] + t[2])


@examples(200)
@given(text=model_outputs, data=st.data())
def test_tool_call_streaming_equals_one_shot_for_any_chunking(text, data):
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=len(text)))
    content, calls = parse_tool_calls(text, TOOLS)
    for pieces in (chunks(text, cuts), list(text), [text]):
        parser = ToolCallParser(TOOLS)
        _, streamed_content, streamed_calls = collect(run(parser, pieces))
        assert not parser.unterminated
        assert streamed_content == content
        # The concatenated fragments of each call are valid JSON equal to the one-shot arguments.
        assert parsed(streamed_calls) == calls


FUZZ_PIECES = ["<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>", "get_weather",
               "now", "city", "days", "x", "3", "\n", " ", "<", "</", "北", "\\n", "\\", '"7"', "True"]


@examples(200)
@given(text=st.lists(st.sampled_from(FUZZ_PIECES), max_size=16).map("".join), data=st.data())
def test_tool_call_streaming_on_arbitrary_tag_soup(text, data):
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=len(text)))
    content, calls = parse_tool_calls(text, TOOLS)
    parser = ToolCallParser(TOOLS)
    _, streamed_content, streamed_calls = collect(run(parser, chunks(text, cuts)))
    if not parser.unterminated:
        assert (streamed_content, parsed(streamed_calls)) == (content, calls)
    else:  # cut off inside a call already announced: one-shot calls that text content instead
        assert (content or "").startswith(streamed_content or "")
        assert parsed(streamed_calls[:-1]) == calls


# ---------------------------------------------------------------------------------------------------
# The whole turn, and the known failures of peer implementations


@st.composite
def assistant_turns(draw):
    start = draw(st.sampled_from(["", "\n", "\n<think>", "<think>", "\n<think>\n"]))
    thought = draw(st.lists(st.sampled_from(REASONING_PIECES[4:] + ["<tool_call>now\n</tool_call>"]), max_size=5))
    end = draw(st.sampled_from(["</think>\n", "</think>", "\n</think>\n\n", ""])) if "think" in start else ""
    return start + "".join(thought) + end + draw(model_outputs)


@examples(150)
@given(text=assistant_turns(), data=st.data(), with_tools=st.booleans(), reasoning=st.booleans())
def test_chat_output_streaming_equals_one_shot(text, data, with_tools, reasoning):
    tools = TOOLS if with_tools else None
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=len(text)))
    expected = parse_chat_output(text, tools, reasoning=reasoning)
    for pieces in (chunks(text, cuts), list(text)):
        parser = ChatOutputParser(tools, reasoning=reasoning)
        r, c, calls = collect(run(parser, pieces))
        if parser.unterminated_tool_call:
            continue  # a cut-off thought can leave a call open; covered by the tool-call tests
        assert ChatOutput(r, c, parsed(calls)) == expected


def test_reasoning_does_not_leak_into_content_in_a_multi_turn_tool_loop():
    # The prompt's past turns are full of <think></think>; the parser only sees this turn's output.
    messages = [
        {"role": "user", "content": "Weather in Oslo and Rome?"},
        {"role": "assistant", "content": "", "reasoning_content": "first Oslo",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "content": "rain"},
        {"role": "assistant", "content": "", "reasoning_content": "now Rome",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "content": "sun"},
    ]
    prompt = render_chat(messages, TOOLS)
    assert prompt.count("<think>") == 2 and prompt.endswith("<|assistant|>")
    outputs = [
        "\n<think>Both known now.</think>\nOslo: rain. Rome: sun.",
        "\n<think>Check Paris too.</think>\n" + "<tool_call>get_weather\n<arg_key>city</arg_key>\n"
        "<arg_value>Paris</arg_value>\n</tool_call>",
    ]
    expected = [ChatOutput("Both known now.", "Oslo: rain. Rome: sun."),
                ChatOutput("Check Paris too.", None, [{"name": "get_weather", "arguments": {"city": "Paris"}}])]
    for output, want in zip(outputs, expected, strict=True):
        assert parse_chat_output(output, TOOLS) == want
        r, c, calls = collect(run(ChatOutputParser(TOOLS), list(output)))
        assert ChatOutput(r, c, parsed(calls)) == want


def test_tool_arguments_are_streamed_incrementally_and_equal_the_non_streamed_result():
    text = ("<tool_call>search\n<arg_key>q</arg_key>\n<arg_value>" + "long value " * 50
            + "</arg_value>\n<arg_key>limit</arg_key>\n<arg_value>5</arg_value>\n</tool_call>")
    events = run(ToolCallParser(TOOLS), list(text))
    fragments = [e.arguments for e in events if isinstance(e, ToolCallDelta) and e.arguments]
    assert len(fragments) > 100  # the string value arrives piece by piece, not at the end
    assert parsed(collect(events)[2]) == parse_tool_calls(text, TOOLS)[1]


@pytest.mark.parametrize("pieces", [["<tool_call>now\n</tool_call>"], list("<tool_call>now\n</tool_call>"),
                                    ["<tool_call>now", "\n</tool_call>"], ["<tool_call>now</tool_call>"]])
def test_zero_argument_call_streams_exactly_empty_object(pieces):
    calls = collect(run(ToolCallParser(TOOLS), pieces))[2]
    assert calls == [{"name": "now", "arguments": "{}"}]


def test_answer_without_thinking_is_content_not_reasoning():
    for output in ("The answer is 4.", "\nThe answer is 4.", "The answer is 4.</think>"):
        result = parse_chat_output(output)
        assert result.reasoning is None and result.content == output.lstrip("\n")
        assert collect(run(ChatOutputParser(), list(output)))[:2] == (None, output.lstrip("\n"))


def test_thinking_disabled_output_is_content():
    prompt = render_chat([{"role": "user", "content": "2+2?"}], enable_thinking=False)
    assert prompt.endswith("<think></think>")
    assert parse_chat_output("\n4", TOOLS) == ChatOutput(None, "4")


def test_tool_call_interrupting_reasoning_ends_it():
    # The model opens a thought and calls a tool without closing it: the reasoning ends at "<tool_call>".
    text = "<think>I need the weather.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Oslo" \
           "</arg_value>\n</tool_call>"
    want = ChatOutput("I need the weather.", None, [{"name": "get_weather", "arguments": {"city": "Oslo"}}])
    assert parse_chat_output(text, TOOLS) == want
    assert parse_reasoning(text) == ("I need the weather.", text[text.index("<tool_call>"):])
    split = text.index("<tool_call>") + 5  # "<tool_call>" split across chunks, and every chunk size
    for pieces in [[text[:split], text[split:]], *all_chunkings(text)]:
        r, c, calls = collect(run(ChatOutputParser(TOOLS), pieces))
        assert ChatOutput(r, c, parsed(calls)) == want
    # A later "</think>" is then plain content; a cut-off call is content, as after a closed thought.
    text = "<think>I could write <tool_call>now\n</tool_call> but won't</think>\nNo call."
    assert parse_chat_output(text, TOOLS) == ChatOutput(
        "I could write ", " but won't</think>\nNo call.", [{"name": "now", "arguments": {}}])
    assert parse_chat_output("<think>maybe <tool_call>now\n", TOOLS) == ChatOutput("maybe ", "<tool_call>now\n")
    # Without "<tool_call>" a cut-off thought is still all reasoning.
    assert parse_chat_output("<think>maybe <tool_ca", TOOLS) == ChatOutput("maybe <tool_ca")


def test_parsers_can_be_switched_off():
    text = "<think>r</think>\n<tool_call>now\n</tool_call>"
    assert parse_chat_output(text, None) == ChatOutput("r", "<tool_call>now\n</tool_call>")
    assert parse_chat_output(text, TOOLS, reasoning=False) == ChatOutput(None, "<think>r</think>\n", [
        {"name": "now", "arguments": {}}])
    assert parse_chat_output(text, None, reasoning=False) == ChatOutput(None, text)
    assert parse_chat_output(" \n", None, reasoning=False) == ChatOutput()
    assert collect(run(ChatOutputParser(None, reasoning=False), [" ", "\n", "x"])) == (None, " \nx", [])


def test_invalid_tools_are_rejected():
    with pytest.raises(ValueError, match=r"tools\[0\] must be"):
        ToolCallParser([{"type": "function"}])


def test_token_stream_through_detokenizer_and_parser(tmp_path):
    tok = build_tiny_tokenizer(tmp_path)
    output = ("\n<think>北京 weather 😀</think>\nChecking.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
              "<arg_value>北京</arg_value>\n<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call><|observation|>")
    ids = tok.encode(output)
    detok, parser, events = IncrementalDetokenizer(tok), ChatOutputParser(TOOLS), []
    for token_id in ids:
        events += parser.feed(detok.feed(token_id))
    events += parser.feed(detok.finish()) + parser.finish()
    r, c, calls = collect(events)
    assert ChatOutput(r, c, parsed(calls)) == parse_chat_output(tok.decode(ids), TOOLS) == ChatOutput(
        "北京 weather 😀", "Checking.\n", [{"name": "get_weather", "arguments": {"city": "北京", "days": 2}}])
