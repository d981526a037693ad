"""Prompt log-probabilities (`SamplingParams.prompt_logprobs`) against a full forward's log_softmax, through
chunked prefill, the prefix cache, preemption and MTP, in batches with requests that do not ask for them. Steps of
at most 32 tokens (the 12-token chunks) run through the captured CPU step where its kernels build, longer ones
eagerly: the prompt rows' logits come from either's hidden states."""

import pytest
import torch
from tiny_checkpoints import save_mtp_model, save_reference

from glm45 import SamplingParams
from glm45.config import EngineConfig
from glm45.engine import LLMEngine

TOLERANCE = 1e-4


def random_prompt(length: int, seed: int) -> list[int]:
    return torch.randint(3, 320, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_reference("glm45_like", tmp_path_factory.mktemp("glm45_like"))


def make_engine(folder, **overrides) -> LLMEngine:
    args = dict(model=str(folder), dtype="float32", device="cpu", max_model_len=512, num_gpu_blocks_override=128,
                block_size=8)
    return LLMEngine(EngineConfig(**{**args, **overrides}))


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict:
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    done, steps = {}, 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                done[output.request_id] = output
        steps += 1
        assert steps < 10_000
    return done


def reference_logprobs(model, prompt: list[int]) -> torch.Tensor:
    """log_softmax of one uncached forward over the whole prompt, float32: row p is the distribution of token p+1."""
    with torch.no_grad():
        return model(torch.tensor([prompt]))[0].float().log_softmax(-1)


def check(output, model, k: int, start: int = 1) -> float:
    """The largest deviation of `output.prompt_logprobs` from the full forward, after checking its shape: None
    before `start` (the request's `prompt_logprobs_from`), the prompt's token and the top k from there."""
    prompt = output.prompt_token_ids
    entries = output.prompt_logprobs
    assert entries is not None and len(entries) == len(prompt) and entries[:start] == [None] * start
    reference = reference_logprobs(model, prompt)
    worst = 0.0
    for position in range(start, len(prompt)):
        entry, row = entries[position], reference[position - 1]
        token = prompt[position]
        assert next(iter(entry)) == token  # the prompt's own token comes first
        top = set(row.topk(k).indices.tolist()) if k else set()
        assert set(entry) == top | {token}
        worst = max(worst, max(abs(value - float(row[t])) for t, value in entry.items()))
    return worst


@pytest.mark.parametrize("chunk", [2048, 12], ids=["whole-prompt", "chunked-prefill"])
def test_prompt_logprobs_equal_a_full_forward_in_a_mixed_batch(checkpoint, chunk):
    engine = make_engine(checkpoint, max_num_batched_tokens=chunk)
    shared = random_prompt(29, 1)
    # Warm the prefix cache with the shared prefix; then a batch where plain requests hit it and the ones asking
    # for prompt log-probabilities bypass it (their positions' logits must be computed).
    run(engine, {"warm": (shared + random_prompt(3, 2), SamplingParams(max_tokens=2))})
    requests = {
        "plain-hit": (shared + random_prompt(7, 3), SamplingParams(max_tokens=5, temperature=0)),
        "scored-shared": (shared + random_prompt(11, 4), SamplingParams(prompt_logprobs=3, max_tokens=4)),
        "scored-alone": (random_prompt(45, 5), SamplingParams(prompt_logprobs=0, max_tokens=1, temperature=0)),
        "plain-long": (random_prompt(40, 6), SamplingParams(max_tokens=6, logprobs=2)),
        "scored-one-token": (random_prompt(1, 7), SamplingParams(prompt_logprobs=5, max_tokens=2)),
        "scored-n2": (random_prompt(20, 8), SamplingParams(prompt_logprobs=20, n=2, max_tokens=3)),
        # Scored from position 33 on: the cache may serve the blocks before it (positions 0-31 predict nothing
        # asked for, and position 32 predicts token 33).
        "scored-suffix": (shared + random_prompt(9, 9), SamplingParams(prompt_logprobs=1, prompt_logprobs_from=33)),
    }
    done = run(engine, requests)
    model = engine.model
    worst = max(check(done[name], model, requests[name][1].prompt_logprobs, requests[name][1].prompt_logprobs_from)
                for name in done if "scored" in name)
    assert worst <= TOLERANCE, worst
    assert done["plain-hit"].num_cached_tokens == 24  # three full 8-token blocks of the shared prefix
    assert done["scored-shared"].num_cached_tokens == 0
    assert done["scored-suffix"].num_cached_tokens == 24
    assert done["scored-one-token"].prompt_logprobs == [None]
    assert all(done[name].prompt_logprobs is None for name in ("plain-hit", "plain-long"))
    # The blocks a scoring request computed serve later requests as usual.
    again = run(engine, {"after": (shared + random_prompt(11, 4), SamplingParams(max_tokens=1))})["after"]
    assert again.num_cached_tokens == 39  # the same prompt as "scored-shared": all but its last token
    assert engine.block_manager.num_free_blocks == 128


def test_prompt_logprobs_survive_preemption(checkpoint):
    """A KV cache far too small for the batch: sequences are preempted mid-prefill and recomputed; each prompt
    token still gets exactly one entry, equal to the full forward's."""
    engine = make_engine(checkpoint, max_num_batched_tokens=16, num_gpu_blocks_override=14, max_model_len=100)
    requests = {f"r{i}": (random_prompt(30 + 5 * i, 10 + i),
                          SamplingParams(prompt_logprobs=2 if i % 2 == 0 else None, max_tokens=20, ignore_eos=True))
                for i in range(6)}
    done = run(engine, requests)
    assert engine.stats()["num_preemptions"] > 0
    worst = max(check(done[f"r{i}"], engine.model, 2) for i in range(0, 6, 2))
    assert worst <= TOLERANCE, worst
    assert engine.block_manager.num_free_blocks == 14


def test_prompt_logprobs_with_mtp_speculative_decoding(tmp_path):
    folder = save_mtp_model(tmp_path / "mtp")
    engine = make_engine(folder, num_speculative_tokens=2, max_num_batched_tokens=16)
    requests = {"a": (random_prompt(37, 1), SamplingParams(prompt_logprobs=1, max_tokens=10, temperature=0)),
                "b": (random_prompt(21, 2), SamplingParams(max_tokens=10, temperature=0))}
    done = run(engine, requests)
    assert check(done["a"], engine.model, 1) <= TOLERANCE


@pytest.mark.parametrize("value", [-1, 21, 2.5, "3"])
def test_prompt_logprobs_out_of_range_is_a_value_error(value):
    with pytest.raises(ValueError, match=r"prompt_logprobs must be an integer in \[0, 20\]"):
        SamplingParams(prompt_logprobs=value)


@pytest.mark.parametrize("value", [0, -3, 2.5])
def test_prompt_logprobs_from_below_one_is_a_value_error(value):
    with pytest.raises(ValueError, match="prompt_logprobs_from must be an integer ≥ 1"):
        SamplingParams(prompt_logprobs=1, prompt_logprobs_from=value)
