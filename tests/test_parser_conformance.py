"""The peers' own GLM-4.5 parser test cases, run against glm45's parsers.

The cases are data in `tests/parser_conformance/` (one file per peer; its README gives the format): inputs and
expected results copied from the tests of vLLM, SGLang (with its router and JAX port) and llama.cpp, each with
its source. A case passes when glm45 gives the peer's expected result, or — where glm45 deliberately differs —
the result the case records next to a decision explained in `decisions.json`. Every case is also streamed in
the peer's chunks, one character at a time and whole, and must give the one-shot result.
"""

import json
from pathlib import Path
from typing import Any

import pytest

from glm45.parsers import (
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

DATA = Path(__file__).parent / "parser_conformance"
SOURCES = ("vllm", "sglang", "llama_cpp")
LOOSE = {"strip_text", "argument_subset"}


def load_sources() -> dict[str, dict]:
    return {name: json.loads((DATA / f"{name}.json").read_text(encoding="utf-8")) for name in SOURCES}


def load_decisions() -> dict[str, dict]:
    return json.loads((DATA / "decisions.json").read_text(encoding="utf-8"))["decisions"]


def all_cases() -> list[tuple[dict, dict]]:
    """(case, its source file's tool fixtures) for every case."""
    return [(case, doc["tools"]) for doc in load_sources().values() for case in doc["cases"]]


# ---------------------------------------------------------------------------------------------------
# Running a case


def one_shot(case: dict, tools: list | None) -> dict[str, Any]:
    """glm45's result for the whole input: the fields of `expected` that the case's parser produces."""
    text = case["input"]
    if case["parser"] == "value":
        return {"value": convert_value(text, case["schema"])}
    if case["parser"] == "reasoning":
        reasoning, content = parse_reasoning(text)
        return {"reasoning": reasoning, "content": content}
    if case["parser"] == "tool_calls":
        content, calls = parse_tool_calls(text, tools)
        return {"content": content, "tool_calls": calls}
    out = parse_chat_output(text, tools, reasoning=case.get("reasoning", True))
    return {"reasoning": out.reasoning, "content": out.content, "tool_calls": out.tool_calls}


def new_stream_parser(case: dict, tools: list | None):
    if case["parser"] == "reasoning":
        return ReasoningParser()
    if case["parser"] == "tool_calls":
        return ToolCallParser(tools)
    return ChatOutputParser(tools, reasoning=case.get("reasoning", True))


def stream(case: dict, tools: list | None, pieces: list[str]) -> dict[str, Any]:
    """Feed `pieces`: the accumulated result before and after `finish()`, whether a call was left open, and how
    many argument fragments were sent."""
    parser = new_stream_parser(case, tools)
    events = [e for piece in pieces for e in parser.feed(piece)]
    before = accumulate(case, events)
    events += parser.finish()
    unterminated = getattr(parser, "unterminated", False) or getattr(parser, "unterminated_tool_call", False)
    fragments = sum(1 for e in events if isinstance(e, ToolCallDelta) and e.arguments)
    return {"before": before, "after": accumulate(case, events), "unterminated": unterminated, "fragments": fragments}


def accumulate(case: dict, events: list) -> dict[str, Any]:
    """What a client rebuilds from the deltas, in the shape of `one_shot`."""
    calls: list[dict[str, Any]] = []
    for e in events:
        if isinstance(e, ToolCallDelta):
            if e.name is not None:
                calls.append({"name": e.name, "arguments": ""})
            calls[-1]["arguments"] += e.arguments
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta)) or None
    content = "".join(e.text for e in events if isinstance(e, ContentDelta)) or None
    parsed = []
    for c in calls:
        try:
            arguments = json.loads(c["arguments"])
        except ValueError:
            arguments = c["arguments"]  # a call whose arguments are still open
        parsed.append({"name": c["name"], "arguments": arguments})
    if case["parser"] == "reasoning":
        return {"reasoning": reasoning, "content": content}
    if case["parser"] == "tool_calls":
        return {"content": content, "tool_calls": parsed}
    return {"reasoning": reasoning, "content": content, "tool_calls": parsed}


# ---------------------------------------------------------------------------------------------------
# Comparing


def same(a: Any, b: Any) -> bool:
    """JSON equality that tells true from 1 and 1 from 1.0, as the peers' tests do."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def mismatches(result: dict[str, Any], expected: dict[str, Any], loose: set[str]) -> list[str]:
    """How `result` differs from `expected` (only the fields `expected` names are compared)."""
    out = []
    for field in ("reasoning", "content"):
        if field in expected:
            got, want = result.get(field) or "", expected[field] or ""  # None and "" both mean none
            if "strip_text" in loose:
                got, want = got.strip(), want.strip()
            if got != want:
                out.append(f"{field}: {result.get(field)!r} != {expected[field]!r}")
    for needle in expected.get("content_contains", ()):
        if needle not in (result.get("content") or ""):
            out.append(f"content {result.get('content')!r} lacks {needle!r}")
    if "tool_calls" in expected:
        got, want = result["tool_calls"], expected["tool_calls"]
        if len(got) != len(want):
            out.append(f"tool_calls: {len(got)} calls {got!r} != {len(want)} calls {want!r}")
        for g, w in zip(got, want, strict=False):
            if g["name"] != w["name"]:
                out.append(f"tool call name {g['name']!r} != {w['name']!r}")
            elif "arguments" in w:
                args = g["arguments"]
                if "argument_subset" in loose:
                    args = {k: args[k] for k in w["arguments"] if isinstance(args, dict) and k in args}
                if not same(args, w["arguments"]):
                    out.append(f"{g['name']} arguments {g['arguments']!r} != {w['arguments']!r}")
    if "value" in expected and not same(result["value"], expected["value"]):
        out.append(f"value {result['value']!r} != {expected['value']!r}")
    return out


def check(case: dict, fixtures: dict[str, list]) -> list[str]:
    """Everything wrong with glm45 on this case (empty: it conforms)."""
    tools = fixtures[case["tools"]] if case.get("tools") else None
    loose = set(case.get("loose", ()))
    want = case["glm45"] if "decision" in case else case["expected"]
    problems = []
    if case["parser"] == "value":
        result = one_shot(case, tools)
        problems += mismatches(result, want, loose)
        if "decision" in case and not mismatches(result, case["expected"], loose):
            problems.append("glm45 now gives the peer's result: the decision is stale")
        return problems
    whole = one_shot(case, tools)
    text = case["input"]
    peer_chunks = case.get("chunks") or [text]
    chunkings = [peer_chunks, list(text) or [""], [text]]
    streamed = [stream(case, tools, pieces) for pieces in chunkings]
    judged = streamed[0]["before"] if case.get("before_finish") else whole
    problems += mismatches(judged, want, loose)
    if "decision" in case and not mismatches(judged, case["expected"], loose):
        problems.append("glm45 now gives the peer's result: the decision is stale")
    for pieces, s in zip(chunkings, streamed, strict=True):
        if s["unterminated"]:  # a call cut off after its name was sent: the one documented divergence
            continue
        if not same(s["after"], whole):
            problems.append(f"streamed in {len(pieces)} pieces: {s['after']!r} != one-shot {whole!r}")
    if streamed[0]["fragments"] < case.get("min_argument_fragments", 0):
        problems.append(f"arguments sent in {streamed[0]['fragments']} fragments, "
                        f"fewer than {case['min_argument_fragments']}")
    return problems


# ---------------------------------------------------------------------------------------------------
# Tests

CASES = all_cases()


@pytest.mark.parametrize("case,fixtures", CASES, ids=[case["id"] for case, _ in CASES])
def test_peer_case(case, fixtures):
    assert check(case, fixtures) == []


def test_cases_are_well_formed():
    decisions = load_decisions()
    ids = [case["id"] for case, _ in CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    for case, fixtures in CASES:
        assert case["parser"] in ("reasoning", "tool_calls", "chat", "value"), case["id"]
        source = case["source"]
        assert source.get("repo") and source.get("file") and source.get("test"), case["id"]
        assert "".join(case.get("chunks", [case["input"]])) == case["input"], case["id"]
        assert set(case.get("loose", ())) <= LOOSE, case["id"]
        assert case.get("tools") is None or case["tools"] in fixtures, case["id"]
        assert ("decision" in case) == ("glm45" in case), case["id"]
        assert case.get("decision") is None or case["decision"] in decisions, case["id"]
    used = {case["decision"] for case, _ in CASES if "decision" in case}
    assert used == set(decisions), f"decisions without cases: {set(decisions) - used}"
    for decision in decisions.values():
        assert decision["glm45"] and decision["peers"] and decision["why"]
