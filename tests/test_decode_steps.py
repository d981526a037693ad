"""Several decode steps in one call of the captured CPU step (`num_scheduler_steps`) against one step a call: the same
tokens and text for greedy and seeded sampled requests, batched and alone, stopping on end tokens, stop strings,
`max_tokens` and the context length inside a run (and runs that end early once every sequence has stopped); the prefix
cache after such stops; requests that need their logits (log-probabilities, penalties) in the batch; a KV cache too
small for a whole run; and MTP's one-program steps run several at a time, with the same drafts accepted."""

import pytest

from glm45 import LLM, SamplingParams
from glm45.config import EngineConfig
from glm45.engine.engine import LLMEngine
from glm45.kernels import cpu

pytestmark = pytest.mark.skipif(cpu.library() is None, reason="the CPU kernels cannot run here (no AVX2 or compiler)")

PROMPTS = ["[gMASK]<sop><|user|>\nWhat is the weather in Oslo?<|assistant|>",
           "[gMASK]<sop><|user|>\nConvert 3 km to miles./nothink<|assistant|>\n<think></think>",
           "[gMASK]<sop><|user|>\nTell me about Lisbon.<|assistant|>",
           "[gMASK]<sop><|user|>\nWrite a story about a lighthouse.<|assistant|>"]


def counting_runs(llm, name="decode_steps") -> list[tuple[int, int]]:
    """(steps asked for, steps run) of the runner's calls of several steps, recorded as they happen."""
    runner, steps = llm.engine.runner, []
    original = getattr(runner, name)

    def run(inputs, count, *args):
        out = original(inputs, count, *args)
        rows = out[0] if name == "draft_step_run" else out  # (per sequence, its tokens per step), …; or rows' tokens
        steps.append((count, len(rows[0])))
        return out

    setattr(runner, name, run)
    return steps


def outputs(llm, prompts, params):
    batched = [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason)
               for o in llm.generate(prompts, params, use_tqdm=False)]
    alone = [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason)
             for p, q in zip(prompts, params, strict=True) for o in llm.generate(p, q, use_tqdm=False)]
    return batched, alone


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_runs_of_decode_steps_give_the_tokens_of_single_steps(dtype):
    """Greedy and seeded sampled requests (top-p, top-k with min-p, a hot one), with `max_tokens` that end runs part
    way, a stop string, the model's end token (no `ignore_eos`), and a context length reached inside a run."""
    params = [SamplingParams(temperature=0, max_tokens=70),
              SamplingParams(temperature=0, max_tokens=13, ignore_eos=True),
              SamplingParams(temperature=0.6, top_p=0.95, max_tokens=40, seed=2),
              SamplingParams(temperature=0.8, top_k=20, min_p=0.05, max_tokens=None, seed=3, ignore_eos=True),
              SamplingParams(temperature=2.0, max_tokens=30, seed=4, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=40, stop=["Lisbon", "."])]
    prompts = PROMPTS + PROMPTS[:2]
    results, runs = {}, {}
    for steps in (1, 8):
        llm = LLM(dtype=dtype, num_scheduler_steps=steps, max_model_len=96)
        runs[steps] = counting_runs(llm)
        results[steps] = outputs(llm, prompts, params)
    assert results[8] == results[1]
    asked = [count for count, _ in runs[8]]
    assert not runs[1] and max(asked) == 8 and min(asked) < 8, runs[8]
    assert any(ran < count for count, ran in runs[8]), runs[8]  # a run that ended when its rows had stopped
    batched, _ = results[8]
    reasons = {reason for _, _, reason in batched}
    assert reasons == {"stop", "length"}, batched
    # a stop token inside a run: the end token ends the first request before its max_tokens
    assert batched[0][2] == "stop" and len(batched[0][0]) < 70
    # the context length, with no max_tokens: 96 minus the prompt
    assert batched[3][2] == "length" and len(batched[3][0]) == 96 - len(llm.engine.tokenizer.encode(prompts[3]))


def test_the_prefix_cache_after_a_run_that_stopped_inside_it():
    """A run writes K/V past a stop (the steps after it are thrown away): a request that continues the stopped
    conversation reuses only the stopped request's own tokens' K/V, and gets what single steps give."""
    first = SamplingParams(temperature=0, max_tokens=11, ignore_eos=True)  # 10 decode tokens: a run of 8, then 2
    follow = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    results = {}
    for steps in (1, 8):
        llm = LLM(dtype="float32", num_scheduler_steps=steps)
        prompt_ids = llm.engine.tokenizer.encode(PROMPTS[2])
        out = llm.generate({"prompt_token_ids": prompt_ids}, first, use_tqdm=False)[0]
        continued = prompt_ids + out.outputs[0].token_ids + llm.engine.tokenizer.encode("<|user|>\nAnd Porto?")
        again = llm.generate({"prompt_token_ids": continued}, follow, use_tqdm=False)[0]
        assert again.num_cached_tokens > len(prompt_ids)
        results[steps] = (out.outputs[0].token_ids, again.outputs[0].token_ids)
    assert results[8] == results[1]


def test_batches_that_need_their_logits_take_single_steps():
    """A request with log-probabilities or a penalty in the batch: every step of that batch is a step of its own
    (the others' tokens are the same either way), and once it has finished the rest run several at a time."""
    params = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=6, logprobs=2, ignore_eos=True),
              SamplingParams(temperature=0.7, max_tokens=40, seed=9, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=5, repetition_penalty=1.3, ignore_eos=True)]
    results = {}
    for steps in (1, 8):
        llm = LLM(dtype="float32", num_scheduler_steps=steps)
        runs = counting_runs(llm)
        out = llm.generate(PROMPTS, params, use_tqdm=False)
        results[steps] = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in out]
    assert results[8] == results[1]
    assert runs and max(count for count, _ in runs) == 8  # after the short requests finished


def test_a_kv_cache_too_small_for_a_run_falls_back_to_single_steps(tiny_checkpoint):
    """Eight sequences in a cache that cannot hold all of their runs' blocks (preemption by recompute, too): they
    run single steps where the blocks are short, and give the tokens they give alone."""
    _, folder = tiny_checkpoint
    args = dict(model=str(folder), dtype="float32", device="cpu", max_model_len=128, num_gpu_blocks_override=14,
                block_size=16)
    prompts = [[(7 * i + j) % 200 + 3 for j in range(20 + 3 * i)] for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    expected = []
    for prompt in prompts:
        engine = LLMEngine(EngineConfig(**args, num_scheduler_steps=1))
        expected.append(run(engine, {"0": prompt}, params)["0"])
    engine = LLMEngine(EngineConfig(**args, num_scheduler_steps=8))
    steps = []
    original = engine.runner.decode_steps
    engine.runner.decode_steps = lambda inputs, count, *args: steps.append(count) or original(inputs, count, *args)
    together = run(engine, {str(i): prompt for i, prompt in enumerate(prompts)}, params)
    assert [together[str(i)] for i in range(8)] == expected
    assert steps, "no run of several steps"
    assert engine.stats()["num_preemptions"] > 0
    assert engine.block_manager.num_free_blocks == 14


def run(engine, prompts: dict[str, list[int]], params) -> dict[str, list[int]]:
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, prompt, params)
    tokens = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                tokens[output.request_id] = output.outputs[0].token_ids
    return tokens


def test_num_scheduler_steps_is_checked():
    for bad in (0, 65):
        with pytest.raises(ValueError, match="num_scheduler_steps"):
            EngineConfig(num_scheduler_steps=bad)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_runs_of_mtp_steps_give_the_tokens_and_acceptances_of_single_steps(dtype):
    """MTP (k=1): runs of one-program draft steps against one such step a call: the same text, the same drafts
    accepted (per request), for greedy and seeded sampled requests (one hot enough to reject drafts), stopping on end
    tokens, `max_tokens` and stop strings; a constrained request in the batch makes its steps single. A stop string
    is found in the text after the step: a run's steps past it were verified all the same, so that request's counts
    include them."""
    from glm45.grammar import StructuredOutputsParams

    answer = StructuredOutputsParams(json={"type": "object", "properties": {"city": {"type": "string"}},
                                           "required": ["city"]})
    params = [SamplingParams(temperature=0, max_tokens=70),
              SamplingParams(temperature=0, max_tokens=13, ignore_eos=True),
              SamplingParams(temperature=0.6, top_p=0.95, max_tokens=40, seed=2),
              SamplingParams(temperature=2.0, max_tokens=30, seed=4, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=40, stop=["Lisbon", "."]),
              SamplingParams(temperature=0.8, top_k=20, min_p=0.05, max_tokens=33, seed=3, ignore_eos=True)]
    prompts = PROMPTS + PROMPTS[:2]
    results, runs = {}, {}
    for steps in (1, 8):
        llm = LLM(dtype=dtype, num_speculative_tokens=1, num_scheduler_steps=steps)
        runs[steps] = counting_runs(llm, "draft_step_run")
        batched, alone = outputs(llm, prompts, params)
        metrics = [o.metrics for o in llm.generate(prompts, params, use_tqdm=False)]
        constrained = llm.generate(prompts[:2], [params[0], SamplingParams(temperature=0, max_tokens=40,
                                                                          structured_outputs=answer)],
                                   use_tqdm=False)
        results[steps] = (batched, alone, [o.outputs[0].text for o in constrained], metrics)
    assert results[8][:3] == results[1][:3]
    runs_metrics, single_metrics = results[8][3], results[1][3]
    stop_string = 4
    assert [m for i, m in enumerate(runs_metrics) if i != stop_string] == \
        [m for i, m in enumerate(single_metrics) if i != stop_string]
    assert runs_metrics[stop_string]["spec_draft_tokens"] >= single_metrics[stop_string]["spec_draft_tokens"]
    assert not runs[1] and max(count for count, _ in runs[8]) == 8, runs[8]
    assert any(ran < count for count, ran in runs[8]), runs[8]
    assert any(0 < m["spec_accepted_tokens"] < m["spec_draft_tokens"] for m in runs_metrics)  # both verdicts
