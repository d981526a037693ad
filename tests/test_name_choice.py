"""A constrained call's name chosen whole (`glm45.engine.name_choice`), on the bundled model: the engine's tokens
equal the plain reference loop's (the recipe's evaluation loop: the model's forward over a contiguous cache) with and
without MTP, captured and eager, batched; a seeded sampled request gives the same output alone and in a batch;
sampled choices follow the whole-name probabilities; and the whole-name choice picks the right unseen tool where the
name decoded token by token does not."""

from __future__ import annotations

import pytest
import torch
from glm45_tiny.evaluate import greedy_generate
from glm45_tiny.synthetic import generate

from glm45 import LLM, SamplingParams
from glm45.chat import plan_chat
from glm45.engine.name_choice import choose_name
from glm45.parsers import parse_reasoning, parse_tool_calls

MAX_TOKENS = 160


def _cases(count: int = 20) -> list[dict]:
    """Unseen-tool requests (tool_choice auto, the server's name constraint), and the same with tool_choice
    required (the prompt prefilled with `<tool_call>`)."""
    cases = []
    for conv in generate(count, 2, "unseen_tools"):
        if "call" not in conv["meta"]:
            continue
        messages = conv["messages"]
        request = messages[:messages.index(next(m for m in messages if m["role"] == "user")) + 1]
        for choice in ("auto", "required"):
            plan = plan_chat(request, conv["tools"], choice,
                             default_template_kwargs={"enable_thinking": conv["enable_thinking"]})
            cases.append({"plan": plan, "tools": conv["tools"], "expected": conv["meta"]["call"]["name"],
                          "choice": choice})
    return cases


@pytest.fixture(scope="module")
def cases():
    return _cases()


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", num_speculative_tokens=1, max_num_seqs=64)


def _params(case, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, structured_outputs=case["plan"].structured_outputs(), **kw)


def _reference(llm, case, whole_names: bool = True) -> list[int]:
    tokenizer = llm.tokenizer
    prompt = tokenizer.encode(case["plan"].prompt)
    constraint = llm.engine.grammar.constraint(case["plan"].structured_outputs(), prompt, max_tokens=MAX_TOKENS)
    if not whole_names:
        constraint.call_names = ()  # names decoded token by token, through the same grammar
    tokens, _ = greedy_generate(llm.engine.model, prompt, set(tokenizer.eos_token_ids), MAX_TOKENS, constraint)
    return tokens


def _name(case, text: str) -> str | None:
    _, content = parse_reasoning(case["plan"].forced_prefix + text)
    _, calls = parse_tool_calls(content or "", case["tools"])
    return calls[0]["name"] if calls else None


def test_engine_equals_the_reference_loop_with_mtp_capture_and_batching(llm, cases):
    reference = [_reference(llm, case) for case in cases]
    prompts = [case["plan"].prompt for case in cases]
    params = [_params(case, temperature=0) for case in cases]
    batched = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in batched] == reference
    eager = LLM(dtype="float32", enforce_eager=True, max_num_seqs=4)
    assert [o.outputs[0].token_ids for o in eager.generate(prompts, params, use_tqdm=False)] == reference
    tokenizer = llm.tokenizer
    # The choice mattered: token by token, some names come out otherwise.
    token_by_token = [_reference(llm, case, whole_names=False) for case in cases]
    right = sum(_name(case, tokenizer.decode(t, skip_special_tokens=False)) == case["expected"]
                for case, t in zip(cases, reference, strict=True))
    right_plain = sum(_name(case, tokenizer.decode(t, skip_special_tokens=False)) == case["expected"]
                      for case, t in zip(cases, token_by_token, strict=True))
    assert right > right_plain and right >= 0.9 * len(cases), (right, right_plain, len(cases))


def test_name_logprobs_are_the_models(llm, cases):
    case = next(c for c in cases if c["choice"] == "required")
    out = llm.generate([case["plan"].prompt], _params(case, temperature=0, logprobs=0), use_tqdm=False)[0].outputs[0]
    ids = llm.tokenizer.encode(case["plan"].prompt) + out.token_ids
    with torch.inference_mode():
        logits = llm.engine.model(torch.tensor([ids])).float().log_softmax(-1)[0]
    start = len(ids) - len(out.token_ids)
    for i, (token, entry) in enumerate(zip(out.token_ids[:6], out.logprobs[:6], strict=True)):
        assert entry[token] == pytest.approx(float(logits[start + i - 1, token]), abs=1e-3)


def test_seeded_sampling_with_name_choices_is_independent_of_the_batch(llm, cases):
    params = [_params(case, temperature=0.8, seed=i) for i, case in enumerate(cases[:8])]
    prompts = [case["plan"].prompt for case in cases[:8]]
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    alone = [llm.generate([p], q, use_tqdm=False)[0].outputs[0].token_ids for p, q in zip(prompts, params, strict=True)]
    assert together == alone


def test_sampled_choices_follow_the_whole_name_probabilities():
    scores = [torch.tensor([-0.5, -0.6]), torch.tensor([-2.0]), torch.tensor([-0.4, -0.4, -0.4])]
    params = SamplingParams(temperature=0.7)
    generator = torch.Generator().manual_seed(0)
    draws = 20_000
    counts = torch.bincount(torch.tensor([choose_name(scores, params, generator) for _ in range(draws)]), minlength=3)
    expected = (torch.stack([s.sum() for s in scores]) / 0.7).softmax(0) * draws
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 13.8  # the 99.9% quantile of chi-square with 2 degrees of freedom
    greedy = SamplingParams(temperature=0)
    assert choose_name(scores, greedy, None) == 2  # the best mean, though not the best sum
