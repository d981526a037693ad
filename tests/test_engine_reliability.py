"""The engine under failure: admission is all-or-nothing (a fault injected at every point of `add_request` leaves
nothing behind), a failing step fails only its own requests, seeds are bounded to 64 bits, delta outputs add up
to the cumulative ones, paused requests wait, and — a hypothesis state machine over add/step/abort/pause with a
KV cache small enough to preempt — every block is accounted for at every step and free at the end."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from server_helpers import save_random_model
from tiny_checkpoints import save_reference

from glm45.config import EngineConfig
from glm45.engine import LLMEngine, SamplingParams
from glm45.engine.engine import StepError
from glm45.engine.output import OutputProcessor, _StopStrings
from glm45.engine.sampling_params import RequestOutputKind
from glm45.engine.scheduler import Scheduler
from glm45.engine.sequence import Sequence
from glm45.tokenizer import IncrementalDetokenizer, Tokenizer

ARGS = dict(dtype="float32", device="cpu", max_model_len=256, num_gpu_blocks_override=64)


@pytest.fixture(scope="module")
def text_engine(tmp_path_factory):
    folder = save_random_model(tmp_path_factory.mktemp("text_model"))
    return LLMEngine(EngineConfig(model=str(folder), **ARGS))


@pytest.fixture(scope="module")
def token_folder(tmp_path_factory):
    return save_reference("air_like", tmp_path_factory.mktemp("air_like"))


def assert_idle(engine: LLMEngine) -> None:
    assert not engine.requests and not engine.output_processor.requests
    assert not engine.scheduler.running and not engine.scheduler.waiting and not engine.scheduler.paused
    stats = engine.stats()
    assert (stats["num_running"], stats["num_waiting"], stats["kv_cache_usage"]) == (0, 0, 0.0)
    assert all(block.ref_count == 0 for block in engine.block_manager.blocks)


def run(engine: LLMEngine) -> dict[str, object]:
    done = {}
    for _ in range(2000):
        if not engine.has_unfinished_requests():
            return done
        for output in engine.step():
            if output.finished:
                done[output.request_id] = output
    raise AssertionError("the engine did not finish")


def failing_at(function, k: int, counter: list[int]):
    """`function`, except that its k-th call (counted across all calls) raises."""

    def wrapper(*args, **kwargs):
        counter[0] += 1
        if counter[0] == k:
            raise RuntimeError(f"injected fault in {function.__qualname__}")
        return function(*args, **kwargs)

    return wrapper


INJECTION_POINTS = [(Tokenizer, "encode"), (Sequence, "__init__"), (LLMEngine, "_generator"),
                    (OutputProcessor, "add_request"), (IncrementalDetokenizer, "__init__"), (_StopStrings, "of"),
                    (Scheduler, "add")]


@pytest.mark.parametrize(("owner", "name"), INJECTION_POINTS, ids=[f"{o.__name__}.{n}" for o, n in INJECTION_POINTS])
def test_a_fault_anywhere_in_add_request_leaves_nothing_behind(text_engine, owner, name, monkeypatch):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=4, stop=["zz"])
    original = owner.__dict__[name]
    function = original.__func__ if isinstance(original, classmethod) else original
    faults = 0
    for k in range(1, 10):
        counter = [0]
        wrapped = failing_at(function, k, counter)
        monkeypatch.setattr(owner, name, classmethod(wrapped) if isinstance(original, classmethod) else wrapped)
        try:
            text_engine.add_request(f"fault-{name}-{k}", "hello there", params)
        except RuntimeError as e:
            assert "injected fault" in str(e)
            faults += 1
            assert_idle(text_engine)
            continue
        finally:
            monkeypatch.setattr(owner, name, original)
        assert counter[0] < k  # the request went in without reaching the k-th call: every call was tried
        break
    assert faults >= 1
    assert len(run(text_engine)) == 1  # the engine still works, and the request that got in completes
    assert_idle(text_engine)


def test_seeds_are_64_bit_and_the_top_seed_runs_with_n_2(text_engine):
    with pytest.raises(ValueError, match="seed must be an integer in"):
        SamplingParams(seed=2**64 - 1)
    with pytest.raises(ValueError, match="seed must be an integer in"):
        SamplingParams(seed=-(2**63) - 1)
    text_engine.add_request("top-seed", "hi", SamplingParams(n=2, seed=2**63 - 1, max_tokens=3, temperature=1.0))
    text_engine.add_request("bottom-seed", "hi", SamplingParams(n=2, seed=-(2**63), max_tokens=3, temperature=1.0))
    done = run(text_engine)
    assert all(len(c.token_ids) == 3 for output in done.values() for c in output.outputs)
    assert_idle(text_engine)


def test_a_failing_step_fails_its_requests_only(token_folder, monkeypatch):
    engine = LLMEngine(EngineConfig(model=str(token_folder), max_num_seqs=1, **ARGS))
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    engine.add_request("expected", [5, 6, 7], greedy)
    expected = run(engine)["expected"].outputs[0].token_ids

    engine.add_request("doomed", [9, 10, 11, 12], greedy)
    engine.add_request("bystander", [5, 6, 7], greedy)  # waiting: max_num_seqs=1 keeps it out of the batch
    forward = engine.runner.forward

    def broken(inputs, rows):
        raise RuntimeError("injected model failure")

    monkeypatch.setattr(engine.runner, "forward", broken)
    with pytest.raises(StepError) as failure:
        engine.step()
    assert failure.value.request_ids == ["doomed"]
    assert "doomed" not in engine.requests and "bystander" in engine.requests
    monkeypatch.setattr(engine.runner, "forward", forward)
    assert run(engine)["bystander"].outputs[0].token_ids == expected
    engine.add_request("later", [5, 6, 7], greedy)
    assert run(engine)["later"].outputs[0].token_ids == expected
    assert_idle(engine)


def test_delta_outputs_add_up_to_the_cumulative_ones(text_engine):
    def params(kind):
        return SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=24, stop=["e t", "ab"], logprobs=2,
                              output_kind=kind)

    text_engine.add_request("whole", "The quick brown fox", params(RequestOutputKind.CUMULATIVE))
    whole = run(text_engine)["whole"]
    # computed as the first was: a prefix-cache hit would compute its last token alone, in other float roundings
    text_engine.block_manager.reset_prefix_cache()
    text_engine.add_request("parts", "The quick brown fox", params(RequestOutputKind.DELTA))
    text, tokens, logprobs, reasons = {}, {}, {}, {}
    while text_engine.has_unfinished_requests():
        for output in text_engine.step():
            for c in output.outputs:
                text[c.index] = text.get(c.index, "") + c.text
                tokens[c.index] = tokens.get(c.index, []) + c.token_ids
                logprobs[c.index] = logprobs.get(c.index, []) + c.logprobs
                reasons[c.index] = c.finish_reason
    for c in whole.outputs:
        assert (text[c.index], tokens[c.index], logprobs[c.index]) == (c.text, c.token_ids, c.logprobs)
        assert reasons[c.index] == c.finish_reason
    assert_idle(text_engine)


@pytest.mark.parametrize("stop", [["e t", "ab"], None])
def test_a_final_only_request_has_one_output_the_cumulative_one(text_engine, stop):
    """`RequestOutputKind.FINAL_ONLY` (what `LLM.generate` asks for): no output until the request finishes, then the
    one a cumulative request ends with (without stop strings its text is decoded once, at the end); other requests
    in the same steps still report every step."""
    def params(kind):
        return SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=24, stop=stop, logprobs=2, output_kind=kind)

    def outputs(*kinds):
        for i, kind in enumerate(kinds):
            text_engine.add_request(f"r{i}", "The quick brown fox", params(kind))
        seen = {f"r{i}": [] for i in range(len(kinds))}
        while text_engine.has_unfinished_requests():
            for output in text_engine.step():
                seen[output.request_id].append(output)
        return list(seen.values())

    (whole,), (final,) = outputs(RequestOutputKind.CUMULATIVE)[0][-1:], outputs(RequestOutputKind.FINAL_ONLY)[0]
    assert final.finished
    assert [(c.text, c.token_ids, c.logprobs, c.finish_reason) for c in final.outputs] == \
        [(c.text, c.token_ids, c.logprobs, c.finish_reason) for c in whole.outputs]
    final_only, every_step = outputs(RequestOutputKind.FINAL_ONLY, RequestOutputKind.CUMULATIVE)
    assert len(final_only) == 1 and final_only[0].finished and len(every_step) > 1
    assert_idle(text_engine)


def test_a_paused_request_waits_and_resumes_where_it_was(token_folder):
    engine = LLMEngine(EngineConfig(model=str(token_folder), **ARGS))
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    engine.add_request("a", [5, 6, 7], greedy)
    engine.add_request("b", [8, 9], greedy)
    engine.step()
    engine.pause_request("a")
    progress = len(engine.requests["a"][0])
    while engine.has_runnable_requests():
        engine.step()
    assert "b" not in engine.requests and len(engine.requests["a"][0]) == progress
    assert engine.stats()["kv_cache_usage"] > 0  # "a" keeps its blocks while paused
    engine.resume_request("a")
    assert len(run(engine)["a"].outputs[0].token_ids) == 5
    assert_idle(engine)


# ---------------------------------------------------------------------------------------------------
# A state machine over the engine's paths, with a KV cache of 10 blocks × 16 tokens so that it preempts.


class EngineMachine(RuleBasedStateMachine):
    engine: LLMEngine | None = None  # built once, shared by the examples (each ends idle)
    folder = None

    @initialize()
    def start(self):
        if EngineMachine.engine is None:
            config = EngineConfig(model=str(EngineMachine.folder), dtype="float32", device="cpu", max_model_len=96,
                                  num_gpu_blocks_override=10, max_num_batched_tokens=48, max_num_seqs=4)
            EngineMachine.engine = LLMEngine(config)
        self.ids = 0
        self.live: list[str] = []

    @rule(length=st.integers(1, 60), shared=st.booleans(), max_tokens=st.integers(1, 30), n=st.integers(1, 3),
          greedy=st.booleans())
    def add(self, length, shared, max_tokens, n, greedy):
        base = [7] * 40 if shared else []  # a common prefix, for the prefix cache
        prompt = (base + [(self.ids * 31 + i) % 300 + 3 for i in range(length)])[:95]
        params = SamplingParams(n=n, temperature=0 if greedy else 1.0, seed=self.ids, ignore_eos=True,
                                max_tokens=min(max_tokens, 96 - len(prompt)))
        self.ids += 1
        self.engine.add_request(f"r{self.ids}", prompt, params)
        self.live.append(f"r{self.ids}")

    @rule()
    def step(self):
        for output in self.engine.step():
            if output.finished:
                self.live.remove(output.request_id)

    # A live request is picked by a number drawn whatever is live: how many requests a step finishes depends on the
    # engine's state, which the examples share (its prefix cache, and runs of decode steps where blocks allow), so
    # what hypothesis draws must not depend on it.
    @rule(pick=st.integers(0, 1000))
    def abort(self, pick):
        if self.live:
            request_id = self.live[pick % len(self.live)]
            assert self.engine.abort_request(request_id)
            self.live.remove(request_id)

    @rule(pick=st.integers(0, 1000), pause=st.booleans())
    def pause_or_resume(self, pick, pause):
        if self.live:
            request_id = self.live[pick % len(self.live)]
            (self.engine.pause_request if pause else self.engine.resume_request)(request_id)

    @invariant()
    def blocks_are_accounted_for(self):
        if self.engine is None:
            return
        holders: dict[int, int] = {}
        for seqs in self.engine.requests.values():
            for seq in seqs:
                for block_id in seq.block_table:
                    holders[block_id] = holders.get(block_id, 0) + 1
        manager = self.engine.block_manager
        assert {b.block_id: b.ref_count for b in manager.blocks if b.ref_count} == holders
        assert sorted(manager.free_block_ids) == sorted(b.block_id for b in manager.blocks if not b.ref_count)
        assert set(self.engine.requests) == set(self.live)

    def teardown(self):
        engine = self.engine
        for request_id in list(self.live):
            engine.resume_request(request_id)
        for _ in range(3000):
            if not engine.has_unfinished_requests():
                break
            for output in engine.step():
                if output.finished:
                    self.live.remove(output.request_id)
        assert not self.live
        assert_idle(engine)


def test_engine_state_machine_frees_every_block(token_folder):
    torch.manual_seed(0)
    EngineMachine.folder, EngineMachine.engine = token_folder, None
    machine = EngineMachine.TestCase
    machine.settings = settings(max_examples=25, stateful_step_count=30, deadline=None,
                                suppress_health_check=list(HealthCheck))
    machine("runTest").runTest()
    assert EngineMachine.engine.stats()["num_preemptions"] > 0  # the small cache made it preempt


def test_stop_matching_looks_up_one_set_per_distinct_length():
    # 100,000 stop strings of one length: each new end position costs one set lookup, not 100,000 comparisons.
    stops = _StopStrings.of([f"#{i:05d}" for i in range(100_000)])
    assert stops.lengths == (6,) and stops.longest == 6
    text = "no stop here, then #04242 and #00001"
    assert stops.first_match(text, 0) == (text.index("#04242") + 6, "#04242")
    assert stops.first_match(text, text.index("#04242") + 6) == (len(text), "#00001")
