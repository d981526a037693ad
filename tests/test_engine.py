"""The engine against transformers' generate, and its invariances: batching, prefix cache, chunked prefill,
preemption, speculative decoding, seeds; plus input validation and block accounting."""

import pytest
import torch
from tiny_checkpoints import build_reference, save_mtp_model, save_reference

from glm45 import LLM, SamplingParams
from glm45.config import EngineConfig
from glm45.engine import LLMEngine


def random_prompt(length: int, seed: int) -> list[int]:
    return torch.randint(3, 320, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def token_prompts(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


GREEDY = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {kind: save_reference(kind, tmp_path_factory.mktemp(kind)) for kind in ("glm45_like", "air_like")}


@pytest.fixture(scope="module")
def mtp_checkpoint(tmp_path_factory):
    return save_mtp_model(tmp_path_factory.mktemp("mtp"))


def make_engine(folder, **overrides) -> LLMEngine:
    args = dict(model=str(folder), dtype="float32", device="cpu", max_model_len=512, num_gpu_blocks_override=128)
    return LLMEngine(EngineConfig(**{**args, **overrides}))


def run_to_completion(engine: LLMEngine, arrivals: dict[int, list[tuple[str, list[int], SamplingParams]]]):
    """Step the engine, adding requests at the steps given; returns the finished outputs by request id."""
    done, step = {}, 0
    pending = dict(arrivals)
    while pending or engine.has_unfinished_requests():
        for request_id, prompt, params in pending.pop(step, []):
            engine.add_request(request_id, prompt, params)
        for output in engine.step():
            if output.finished:
                done[output.request_id] = output
        step += 1
        assert step < 10_000
    return done


@pytest.mark.parametrize("kind", ["glm45_like", "air_like"])
def test_greedy_matches_transformers_generate(checkpoints, kind):
    reference = build_reference(kind)
    llm = LLM(str(checkpoints[kind]), dtype="float32", device="cpu", max_model_len=512, num_gpu_blocks_override=64)
    prompts = [random_prompt(n, seed) for seed, n in enumerate((3, 17, 40, 9))]
    outputs = llm.generate(token_prompts(prompts), GREEDY, use_tqdm=False)
    for prompt, output in zip(prompts, outputs, strict=True):
        with torch.no_grad():
            expected = reference.generate(torch.tensor([prompt]), max_new_tokens=64, min_new_tokens=64,
                                          do_sample=False, eos_token_id=None, pad_token_id=0)
        assert output.outputs[0].token_ids == expected[0, len(prompt):].tolist()
        assert output.outputs[0].finish_reason == "length"
    assert llm.engine.block_manager.num_free_blocks == 64


def test_batch_invariance_with_prefix_cache_chunked_prefill_and_preemption(checkpoints):
    folder = checkpoints["glm45_like"]
    shared = random_prompt(40, 99)  # a common prefix of several prompts: prefix-cache hits
    prompts = [shared + random_prompt(5 + i, i) if i % 3 == 0 else random_prompt(10 + 7 * i, i) for i in range(17)]
    lengths = [20 + (i * 7) % 30 for i in range(17)]

    alone = {}
    for i, prompt in enumerate(prompts):
        engine = make_engine(folder)
        params = SamplingParams(temperature=0, max_tokens=lengths[i], ignore_eos=True)
        alone[i] = run_to_completion(engine, {0: [(str(i), prompt, params)]})[str(i)].outputs[0].token_ids

    # 17 requests arriving over the first steps, a 48-token step budget (chunked prefill) and a KV cache
    # far too small for all of them at once (preemption by recompute).
    engine = make_engine(folder, max_num_batched_tokens=48, num_gpu_blocks_override=24, max_model_len=256)
    arrivals = {}
    for i, prompt in enumerate(prompts):
        params = SamplingParams(temperature=0, max_tokens=lengths[i], ignore_eos=True)
        arrivals.setdefault((i * 3) % 11, []).append((str(i), prompt, params))
    together = run_to_completion(engine, arrivals)
    stats = engine.stats()
    assert stats["num_preemptions"] > 0
    assert stats["prefix_cache_hits"] > 0
    for i in range(17):
        assert together[str(i)].outputs[0].token_ids == alone[i], f"request {i} differs"
    assert engine.block_manager.num_free_blocks == 24


def test_prefix_cache_hit_gives_the_same_output(checkpoints):
    """Hits below block granularity: a repeated prompt computes only its last token, and a prompt that goes on from
    inside the last, partly filled block an earlier request left computes only its new tokens; a full cached block
    that a prompt departs from inside is not overwritten. Each gives what an engine without a prefix cache gives."""
    engine = make_engine(checkpoints["air_like"])
    cold = make_engine(checkpoints["air_like"], enable_prefix_caching=False)

    def same_as_cold(request_id, prompt, params=GREEDY):
        out = run_to_completion(engine, {0: [(request_id, prompt, params)]})[request_id]
        assert out.outputs[0].token_ids == run_to_completion(cold, {0: [(request_id, prompt, params)]})[
            request_id].outputs[0].token_ids
        return out.num_cached_tokens

    prompt = random_prompt(70, 5)
    assert same_as_cold("a", prompt) == 0
    # four full 16-token blocks, and 5 of the 6 prompt tokens in the fifth (the last token is always computed)
    assert same_as_cold("b", prompt) == 69
    branch = prompt[:67] + random_prompt(9, 6)
    assert branch[67] != prompt[67]
    assert same_as_cold("c", branch) == 64  # "b"'s fifth block is full and cached: kept whole for its prefix

    four = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    short = random_prompt(70, 7)
    assert same_as_cold("d", short, four) == 0
    branch = short[:67] + random_prompt(9, 8)
    assert branch[67] != short[67]
    assert same_as_cold("e", branch) == 67  # "d" left its fifth block partly filled: taken over
    talk = random_prompt(70, 10)
    assert same_as_cold("f", talk, four) == 0
    answer = run_to_completion(cold, {0: [("f", talk, four)]})["f"].outputs[0].token_ids
    # the conversation goes on: "f"'s K/V covers its prompt and its answer's first 3 tokens (the 4th was not fed)
    assert same_as_cold("g", talk + answer + random_prompt(5, 9)) == 73
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_prefix_cache_leaves_a_block_in_use_to_its_owner(checkpoints):
    """A cached block that a running sequence holds is shared whole or not at all: the same prompt arriving while
    the first still decodes recomputes the block the first will not give up, and both get the same tokens."""
    engine = make_engine(checkpoints["air_like"])
    prompt = random_prompt(80, 9)  # five full blocks: the fifth is hashed, and in use while "a" decodes
    done = run_to_completion(engine, {0: [("a", prompt, GREEDY)], 3: [("b", prompt, GREEDY)]})
    assert done["b"].num_cached_tokens == 64
    assert done["b"].outputs[0].token_ids == done["a"].outputs[0].token_ids
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_speculative_prefix_cache_shares_a_block_when_the_token_after_it_matches(mtp_checkpoint):
    """With MTP a block's MTP K/V at its last position used the token after the block: a hit needs that token
    too. The drafts after a hit are those of an engine without a prefix cache."""
    prompt = random_prompt(70, 5)
    diverging = prompt[:64] + random_prompt(6, 6)  # the same four blocks, then another 65th token
    assert diverging[64] != prompt[64]

    def drafted(engine, arrivals):
        drafts, propose = [], engine.executor.propose_drafts
        def recording():
            proposed = propose()
            drafts.extend(d for _, d, _ in proposed)
            return proposed
        engine.executor.propose_drafts = recording
        try:
            return run_to_completion(engine, arrivals), drafts
        finally:
            engine.executor.propose_drafts = propose

    # Drafts are recorded per step: one step a call (runs of steps end where their timing says, and a run's
    # intermediate drafts are not proposed separately).
    engine = make_engine(mtp_checkpoint, num_speculative_tokens=1, num_scheduler_steps=1)
    run_to_completion(engine, {0: [("a", prompt, GREEDY)]})
    hit, hit_drafts = drafted(engine, {0: [("b", prompt, GREEDY)]})
    assert hit["b"].num_cached_tokens == 69  # all but the last token: the MTP K/V at 68 was made with the same 69th
    partial, partial_drafts = drafted(engine, {0: [("c", diverging, GREEDY)]})
    # the fourth block's MTP K/V at its last position was made with another 65th token: not shared, and (cached
    # for the first prompt) not overwritten either
    assert partial["c"].num_cached_tokens == 48

    cold = make_engine(mtp_checkpoint, num_speculative_tokens=1, enable_prefix_caching=False, num_scheduler_steps=1)
    expected, expected_drafts = drafted(cold, {0: [("b", prompt, GREEDY)]})
    assert hit["b"].outputs[0].token_ids == expected["b"].outputs[0].token_ids
    assert hit_drafts == expected_drafts
    expected, expected_drafts = drafted(cold, {0: [("c", diverging, GREEDY)]})
    assert partial["c"].outputs[0].token_ids == expected["c"].outputs[0].token_ids
    assert partial_drafts == expected_drafts


def test_speculative_prefix_cache_below_blocks_gives_the_drafts_of_no_cache(mtp_checkpoint):
    """Prompts that repeat, branch inside a block and extend earlier ones, arriving while others run, with requests
    that stop early and leave partly filled blocks: each request gets the tokens and the draft distributions (so the
    MTP layer's K/V is right too) of an engine without a prefix cache running it alone. Seeded sampling, so the
    drafts carry their distributions."""
    base = random_prompt(41, 11)
    prompts = [base, base, base[:37] + random_prompt(8, 12), base + random_prompt(20, 13), base[:40],
               base + random_prompt(20, 13)[:9] + random_prompt(5, 14), base[:20] + random_prompt(30, 15), base]
    lengths = [3, 9, 1, 6, 12, 4, 2, 7]

    def params(i):
        return SamplingParams(temperature=1.0, seed=i, max_tokens=lengths[i], ignore_eos=True)

    def drafts_by_request(engine, arrivals):
        drafts, propose = {}, engine.executor.propose_drafts
        def recording():
            proposed = propose()
            for seq, draft, probs in proposed:
                drafts.setdefault(seq.request_id, []).append((draft, probs.clone()))
            return proposed
        engine.executor.propose_drafts = recording
        try:
            done = run_to_completion(engine, arrivals)
        finally:
            engine.executor.propose_drafts = propose
        return drafts, done

    engine = make_engine(mtp_checkpoint, num_speculative_tokens=1)
    arrivals = {}
    for i, prompt in enumerate(prompts):
        arrivals.setdefault(4 * i if i % 3 else 4 * i + 1, []).append((str(i), prompt, params(i)))
    drafts, done = drafts_by_request(engine, arrivals)
    assert sum(out.num_cached_tokens % 16 != 0 for out in done.values()) >= 3  # hits inside blocks happened
    cold = make_engine(mtp_checkpoint, num_speculative_tokens=1, enable_prefix_caching=False)
    for i, prompt in enumerate(prompts):
        alone, expected = drafts_by_request(cold, {0: [(str(i), prompt, params(i))]})
        where = f"request {i} (cached {done[str(i)].num_cached_tokens})"
        assert done[str(i)].outputs[0].token_ids == expected[str(i)].outputs[0].token_ids, where
        got, want = drafts.get(str(i), []), alone.get(str(i), [])
        assert [d for d, _ in got] == [d for d, _ in want], where
        for (_, got_probs), (_, want_probs) in zip(got, want, strict=True):
            torch.testing.assert_close(got_probs, want_probs, rtol=0, atol=1e-5, msg=where)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_speculative_request_that_ends_early_leaves_its_blocks_to_the_prefix_cache(mtp_checkpoint):
    """With MTP a block is shared only once the MTP layer ran over it: a request that ends in its prefill step
    (max_tokens=1) or on a draft step still gets it, so the same prompt again is a hit, with the same output and
    the same drafts as an engine without a prefix cache; every block is returned."""
    prompt = random_prompt(70, 7)
    one = SamplingParams(temperature=0, max_tokens=1)
    three = SamplingParams(temperature=0, max_tokens=3)
    engine = make_engine(mtp_checkpoint, num_speculative_tokens=1)
    cold = make_engine(mtp_checkpoint, num_speculative_tokens=1, enable_prefix_caching=False)
    first = run_to_completion(engine, {0: [("a", prompt, one)]})["a"]
    again = run_to_completion(engine, {0: [("b", prompt, one)]})["b"]
    assert first.num_cached_tokens == 0 and again.num_cached_tokens == 69
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    longer = prompt + random_prompt(20, 8)
    run_to_completion(engine, {0: [("c", longer, three)]})
    hit = run_to_completion(engine, {0: [("d", longer, three)]})["d"]
    assert hit.num_cached_tokens == 89
    assert hit.outputs[0].token_ids == run_to_completion(cold, {0: [("d", longer, three)]})["d"].outputs[0].token_ids
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("k", [1, 2, 3])
def test_speculative_greedy_equals_plain_decoding(mtp_checkpoint, k):
    prompts = [random_prompt(n, seed) for seed, n in enumerate((4, 19, 33, 50))]
    plain = LLM(str(mtp_checkpoint), dtype="float32", device="cpu", num_gpu_blocks_override=128, max_model_len=512)
    expected = [o.outputs[0].token_ids for o in plain.generate(token_prompts(prompts), GREEDY, use_tqdm=False)]
    spec = LLM(str(mtp_checkpoint), dtype="float32", device="cpu", num_gpu_blocks_override=128, max_model_len=512,
               num_speculative_tokens=k)
    got = [o.outputs[0].token_ids for o in spec.generate(token_prompts(prompts), GREEDY, use_tqdm=False)]
    assert got == expected
    stats = spec.engine.stats()
    # drafts were both accepted and rejected at every position, so every verification path ran
    assert all(0.0 < rate < 1.0 for rate in stats["spec_acceptance_rates"]), stats["spec_acceptance_rates"]
    assert stats["spec_mean_accepted_length"] > 1.0
    assert spec.engine.block_manager.num_free_blocks == 128


def test_seeded_sampling_is_independent_of_the_batch(checkpoints):
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=24, ignore_eos=True)
    prompt = random_prompt(12, 3)
    llm = LLM(str(checkpoints["air_like"]), dtype="float32", device="cpu", num_gpu_blocks_override=64,
              max_model_len=512)
    alone = llm.generate(token_prompts([prompt]), params, use_tqdm=False)[0].outputs[0].token_ids
    others = [random_prompt(5 + i, 50 + i) for i in range(6)]
    other_params = SamplingParams(temperature=1.0, max_tokens=10 + 3 * 2, ignore_eos=True)
    mixed = llm.generate(token_prompts(others[:3] + [prompt] + others[3:]),
                         [other_params] * 3 + [params] + [other_params] * 3, use_tqdm=False)
    assert mixed[3].outputs[0].token_ids == alone
    unseeded = SamplingParams(temperature=0.9, max_tokens=24, ignore_eos=True)
    a, b = llm.generate(token_prompts([prompt, prompt]), unseeded, use_tqdm=False)
    assert a.outputs[0].token_ids != b.outputs[0].token_ids  # no seed: independent draws


def test_speculative_sampling_is_seeded_and_valid(mtp_checkpoint):
    llm = LLM(str(mtp_checkpoint), dtype="float32", device="cpu", num_gpu_blocks_override=128, max_model_len=512,
              num_speculative_tokens=2)
    params = SamplingParams(temperature=0.8, seed=7, max_tokens=40, ignore_eos=True)
    first = llm.generate(token_prompts([random_prompt(9, 1)]), params, use_tqdm=False)[0].outputs[0].token_ids
    again = llm.generate(token_prompts([random_prompt(9, 1)]), params, use_tqdm=False)[0].outputs[0].token_ids
    assert first == again and len(first) == 40


def test_stop_token_ids_and_n(checkpoints):
    llm = LLM(str(checkpoints["air_like"]), dtype="float32", device="cpu", num_gpu_blocks_override=64,
              max_model_len=512)
    prompt = random_prompt(10, 8)
    full = llm.generate(token_prompts([prompt]), GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    stop_at = full[5]
    stopped = llm.generate(token_prompts([prompt]), SamplingParams(temperature=0, max_tokens=64,
                                                                    stop_token_ids=[stop_at]), use_tqdm=False)
    completion = stopped[0].outputs[0]
    assert completion.token_ids == full[: full.index(stop_at) + 1]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop_at
    # the model's end tokens (ids 0, 1, 2 in its config) stop generation unless ignore_eos
    multi = llm.generate(token_prompts([prompt]), SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=1,
                                                                  logprobs=2), use_tqdm=False)[0]
    assert [c.index for c in multi.outputs] == [0, 1, 2]
    for completion in multi.outputs:
        assert len(completion.logprobs) == len(completion.token_ids)
        for token, logprobs in zip(completion.token_ids, completion.logprobs, strict=True):
            assert token in logprobs and len(logprobs) >= 2 and all(v <= 0 for v in logprobs.values())


def test_bad_input_is_a_clear_value_error(checkpoints):
    engine = make_engine(checkpoints["air_like"], max_model_len=64)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("a", [], GREEDY)
    with pytest.raises(ValueError, match="max_model_len is 64"):
        engine.add_request("b", list(range(3, 70)), GREEDY)
    with pytest.raises(ValueError, match=r"plus max_tokens \(64\) exceeds max_model_len \(64\)"):
        engine.add_request("c", [5, 6, 7], GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request("d", [5, 100000], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="no tokenizer"):
        engine.add_request("e", "hello", SamplingParams(max_tokens=4))
    engine.add_request("f", [5, 6], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("f", [5, 6], SamplingParams(max_tokens=4))
    for bad in [dict(temperature=-1), dict(top_p=0), dict(top_k=-5), dict(max_tokens=0), dict(n=0),
                dict(presence_penalty=3), dict(repetition_penalty=0), dict(logprobs=50), dict(min_p=2)]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="unknown engine arguments"):
        LLM(str(checkpoints["air_like"]), max_num_sequences=3)


def test_abort_returns_every_block(checkpoints):
    engine = make_engine(checkpoints["glm45_like"], max_num_batched_tokens=32)
    for i in range(6):
        engine.add_request(str(i), random_prompt(30 + 10 * i, i), SamplingParams(temperature=0, max_tokens=100))
    for _ in range(8):
        engine.step()
    assert engine.block_manager.num_free_blocks < 128
    for i in range(6):
        assert engine.abort_request(str(i))
    assert engine.block_manager.num_free_blocks == 128
    assert not engine.has_unfinished_requests() and engine.step() == []


def test_long_prompt_through_chunked_prefill_in_a_small_kv_budget(checkpoints):
    reference = build_reference("air_like")
    prompt = random_prompt(3000, 11)
    # 3,000 prompt tokens in chunks of 256, in a cache of 200 blocks (3,200 tokens)
    engine = make_engine(checkpoints["air_like"], max_num_batched_tokens=256, num_gpu_blocks_override=200,
                         max_model_len=3100)
    out = run_to_completion(engine, {0: [("long", prompt, SamplingParams(temperature=0, max_tokens=8))]})
    with torch.no_grad():
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)
    assert out["long"].outputs[0].token_ids == expected[0, 3000:].tolist()


def test_the_kv_budget_leaves_room_for_the_measured_largest_step(checkpoints):
    """On one GPU the KV budget is what gpu_memory_utilization leaves after the memory in use and the largest
    step's measured activations (5% when unmeasured, under tensor parallelism). The profiling step itself —
    max_num_batched_tokens in one forward, logits and top-p distributions for max_num_seqs rows — runs through
    the engine's own forward, here on CPU, and writes only its own cache."""
    from glm45.engine.model_runner import cuda_kv_budget, profile_step
    from glm45.model import Glm4MoeForCausalLM

    gib = 2**30
    assert cuda_kv_budget(100 * gib, 60 * gib, 0.9, 3 * gib) == 47 * gib  # 90 allowed − 40 in use − 3
    assert cuda_kv_budget(100 * gib, 60 * gib, 0.9, None) == 45 * gib     # − 5% when not measured
    assert cuda_kv_budget(100 * gib, 5 * gib, 0.9, 3 * gib) == 0
    model = Glm4MoeForCausalLM.from_pretrained(checkpoints["air_like"], dtype="float32", progress=False).eval()
    config = EngineConfig(max_num_batched_tokens=70, max_num_seqs=8, block_size=16)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    cache_bytes = profile_step(config, model, model.config.num_hidden_layers)
    per_block = 2 * model.config.num_hidden_layers * 16 * model.config.num_key_value_heads * model.config.head_dim * 4
    assert cache_bytes == (5 + 1) * per_block  # ⌈70 / 16⌉ blocks and the scratch block
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())
