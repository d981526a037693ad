"""The engine with tensor parallelism (and expert parallelism) over 2 processes: the engine spawns its worker,
generations equal the single-process engine's, and a worker that dies takes the engine down with a clear error."""

import os
import signal

import pytest
import torch
from tiny_checkpoints import save_mtp_model, save_reference

from glm45 import LLM, SamplingParams
from glm45.config import EngineConfig
from glm45.engine import LLMEngine
from glm45.engine.workers import WorkerError

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
ARGS = dict(dtype="float32", device="cpu", max_model_len=256, num_gpu_blocks_override=64, max_num_batched_tokens=32)


def prompts() -> list[dict]:
    lengths = (3, 17, 40, 9)
    return [{"prompt_token_ids": torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(n)).tolist()}
            for n in lengths]


def generate(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts(), GREEDY, use_tqdm=False)]


def test_tensor_parallel_greedy_equals_single_process_and_a_dead_worker_stops_it(tmp_path):
    folder = save_reference("glm45_like", tmp_path)
    single = LLM(str(folder), **ARGS)
    expected = generate(single)
    llm = LLM(str(folder), tensor_parallel_size=2, **ARGS)
    engine = llm.engine
    try:
        assert engine.kv_cache.shape[4] == 1  # this rank caches 1 of the 2 KV heads
        assert generate(llm) == expected       # chunked prefill (32-token steps) and batching included
        scored = SamplingParams(prompt_logprobs=2, max_tokens=1)  # prompt rows' logits: the workers' `logits` call
        for one, two in zip(single.generate(prompts(), scored, use_tqdm=False),
                            llm.generate(prompts(), scored, use_tqdm=False), strict=True):
            assert len(two.prompt_logprobs) == len(one.prompt_logprobs) and two.prompt_logprobs[0] is None
            for a, b in zip(one.prompt_logprobs[1:], two.prompt_logprobs[1:], strict=True):
                assert a.keys() == b.keys() and all(abs(a[t] - b[t]) <= 1e-4 for t in a)
        worker = engine.workers.processes[0]
        engine.check_health()
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(10)
        with pytest.raises(WorkerError, match="worker rank 1"):  # what a server's health check would see
            engine.check_health()
        with pytest.raises(WorkerError, match=r"worker rank 1 \(pid \d+\) exited with code -9.*must be restarted"):
            llm.generate(prompts(), GREEDY, use_tqdm=False)
        with pytest.raises(WorkerError):  # and it stays down
            engine.step()
    finally:
        engine.shutdown()
    assert not worker.is_alive()


def test_expert_parallel_with_mtp_speculation_equals_single_process(tmp_path):
    folder = save_mtp_model(tmp_path)
    args = dict(ARGS, num_speculative_tokens=2)
    expected = generate(LLM(str(folder), **args))
    llm = LLM(str(folder), tensor_parallel_size=2, enable_expert_parallel=True, **args)
    try:
        assert generate(llm) == expected
        assert llm.engine.stats()["spec_mean_accepted_length"] > 1.0  # drafts of the sharded MTP layer accepted
        workers = llm.engine.workers.processes
    finally:
        llm.engine.shutdown()
    assert all(not w.is_alive() and w.exitcode == 0 for w in workers)  # they left their loop and exited cleanly


def test_parallel_settings_are_validated(tmp_path):
    with pytest.raises(ValueError, match="tensor_parallel_size must be ≥ 1"):
        EngineConfig(tensor_parallel_size=0)
    folder = save_reference("air_like", tmp_path)
    with pytest.raises(ValueError, match="pass EngineConfig.model instead of a loaded model"):
        from glm45.model import Glm4MoeForCausalLM

        LLMEngine(EngineConfig(model=str(folder), tensor_parallel_size=2),
                  model=Glm4MoeForCausalLM.from_pretrained(folder, progress=False))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            LLMEngine(EngineConfig(model=str(folder), device="cuda", tensor_parallel_size=2))


def test_glm45_serve_with_tensor_parallel_size_2_answers_like_one_process(tmp_path):
    """The real CLI in a subprocess (`glm45 serve --tensor-parallel-size 2` on CPU) against an in-process
    single-device server, with the official client; SIGTERM then stops the server and its worker cleanly."""
    import subprocess
    import sys
    import time
    import urllib.request

    from openai import OpenAI
    from server_helpers import ServerThread, free_port, save_random_model

    folder = save_random_model(tmp_path / "model")
    request = dict(model="tiny", messages=[{"role": "user", "content": "What is a tokenizer?"}], max_tokens=24,
                   temperature=0)
    with ServerThread(folder) as single:
        expected = OpenAI(base_url=single.base_url, api_key="none").chat.completions.create(**request)
    port = free_port()
    command = [sys.executable, "-m", "glm45.cli", "serve", str(folder), "--served-model-name", "tiny",
               "--tensor-parallel-size", "2", "--device", "cpu", "--dtype", "float32", "--max-model-len", "1024",
               "--num-gpu-blocks-override", "512", "--port", str(port), "--uvicorn-log-level", "warning"]
    server = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE,
                              text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline, "the tensor-parallel server did not start"
                time.sleep(0.5)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        got = client.chat.completions.create(**request)
        assert got.choices[0].message.content == expected.choices[0].message.content
        assert got.choices[0].message.reasoning_content == expected.choices[0].message.reasoning_content
        assert got.usage.completion_tokens == expected.usage.completion_tokens
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
        log = server.stderr.read()
    assert code == 0, log
    assert "Traceback" not in log, log


TORCHRUN_SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from glm45 import LLM, SamplingParams
llm = LLM(sys.argv[1], tensor_parallel_size=2, **json.loads(sys.argv[3]))  # ranks > 0 serve steps, then exit
outputs = llm.generate(json.loads(sys.argv[4]), SamplingParams(**json.loads(sys.argv[5])), use_tqdm=False)
open(sys.argv[2], "w").write(json.dumps([o.outputs[0].token_ids for o in outputs]))
llm.engine.shutdown()
"""


def test_torchrun_ranks_serve_like_one_process(tmp_path):
    """Every rank runs the same script under torchrun; rank 0 gets the engine, rank 1 serves its steps."""
    import json
    import subprocess
    import sys

    from glm45.distributed import free_port

    folder = save_reference("air_like", tmp_path / "model")
    expected = generate(LLM(str(folder), **ARGS))
    script = tmp_path / "serve.py"
    script.write_text(TORCHRUN_SCRIPT)
    out = tmp_path / "tokens.json"
    greedy = dict(temperature=0, max_tokens=24, ignore_eos=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), str(script), str(folder), str(out), json.dumps(ARGS),
               json.dumps(prompts()), json.dumps(greedy)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(out.read_text()) == expected


def test_a_parallel_llm_releases_its_workers_on_shutdown_exit_and_garbage_collection(tmp_path):
    import gc

    folder = save_reference("air_like", tmp_path)
    with LLM(str(folder), tensor_parallel_size=2, **ARGS) as first:
        expected = generate(first)
        workers = list(first.engine.workers.processes)
    assert all(not w.is_alive() for w in workers)
    with pytest.raises(WorkerError, match="shut down"):
        generate(first)
    second = LLM(str(folder), tensor_parallel_size=2, **ARGS)  # the first one left the process group
    workers = list(second.engine.workers.processes)
    assert generate(second) == expected
    del second
    gc.collect()
    assert all(not w.is_alive() for w in workers)
    third = LLM(str(folder), tensor_parallel_size=2, **ARGS)
    try:
        assert generate(third) == expected
    finally:
        third.shutdown()
        third.shutdown()  # idempotent


def test_block_tables_travel_as_deltas_and_arrive_whole():
    """Rank 0's mirror encodes, a worker's decodes (through pickle, as the control group sends them): tables that
    grow send their new blocks, a table that changed otherwise (a preemption) or a sequence that comes back after a
    forward without it goes whole, drafts add without forgetting, and every decoded table equals the original."""
    import pickle

    from glm45.engine.attention import SeqSlice, StepInputs
    from glm45.engine.workers import BlockTableMirror

    def step(tables: dict[int, list[int]]) -> StepInputs:
        slices = [SeqSlice(i, 1, 16 * len(t), list(t), seq_id) for i, (seq_id, t) in enumerate(tables.items())]
        return StepInputs([0] * len(slices), [0] * len(slices), [0] * len(slices), slices)

    sender, receiver = BlockTableMirror(), BlockTableMirror()
    long = list(range(2000))
    calls = [("forward", {1: long, 2: [7, 8]}),
             ("draft", {1: long}),
             ("forward", {1: long + [2000], 2: [7, 8, 9], 3: [4]}),   # growth; a new sequence
             ("forward", {1: long + [2000], 2: [5]}),                 # 2 was preempted and re-admitted; 3 left
             ("forward", {1: long + [2000, 2001], 3: [4, 6]}),        # 3 comes back: whole
             ("draft", {3: [4, 6]}),
             ("forward", {1: long[:10]})]                             # a shorter table: whole
    sizes = []
    for name, tables in calls:
        inputs = step(tables)
        wire = pickle.dumps(sender.encode(inputs, forget_others=name == "forward"))
        sizes.append(len(wire))
        decoded = receiver.decode(pickle.loads(wire), forget_others=name == "forward")
        assert [s.block_table for s in decoded.slices] == list(tables.values())
        assert decoded.slices == inputs.slices
    full = len(pickle.dumps(step(calls[2][1])))
    assert max(sizes[1:3]) < 600 and full > 4000  # a known 2,000-block table costs a few bytes, not its length
