"""The measurements of `bench_peers.py`, one engine per process: glm45 (its public `LLM` API), llama.cpp
(llama-cpp-python's low-level C API: `llama_batch`, `llama_decode`, the greedy sampler) and transformers
(`generate`). Each `run_*` function loads one model once, runs the workloads it is given and returns plain
numbers; `bench_peers.py --worker ...` calls it and prints the result as one JSON line.

Workloads (the same prompts for every engine: random ids below the model's special tokens, by seed):
- `decode`: batch 1, a 64-token prompt then 128 greedy tokens; tok/s of the 127 tokens after the first, i.e.
  prefill excluded. llama.cpp is timed around its decode loop; glm45 and transformers, which return only at
  the end, by the difference between generating 128 tokens and generating 1 (each on a fresh prompt of the
  same length, so no prefix cache helps).
- `batch`: 64 requests of mixed prompt lengths × 128 tokens; total generated tok/s, prefill included. glm45
  gets them all at once; transformers in static left-padded batches of 16; llama.cpp 16 sequences at a time
  (prompts packed into `n_batch`-token batches, then one 16-token batch per step).
- `prefill`: a 2048-token prompt; prompt tokens per second to the first token's logits.
- `check`: log-probabilities on a 16-token prompt along glm45 bf16's 32 greedy tokens (teacher-forced), for
  the cross-engine parity check in `bench_peers.py`.
Decode and prefill report the best of `REPEATS` runs (different prompts) in the process: on a shared machine
another job can take a core for a while, and the best run is the one that had both. The batch workload runs
once. The spread that remains shows in the table's range over rounds.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

CHECK_PROMPT_LEN, CHECK_TOKENS, CHECK_TOP = 16, 32, 20
REPEATS = 3  # decode and prefill: best of this many in a process (a shared machine's other work comes and goes)
MTP_PASSES = 24  # the MTP chats: best of this many passes (one is ~50 ms of decoding, shorter than a busy spell)


class Unavailable(Exception):
    """The engine cannot run this configuration (e.g. glm45 without `quantization=`)."""


# ---------------------------------------------------------------------- prompts
def token_limit(model_dir: str) -> int:
    """Ids below this are ordinary tokens: the first special token is the config's first eos id."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    eos = config.get("eos_token_id") or [config["vocab_size"]]
    return (eos if isinstance(eos, int) else min(eos))


def make_prompts(model_dir: str, lengths: list[int], seed: int) -> list[list[int]]:
    limit = token_limit(model_dir)
    rng = random.Random(seed)
    return [[rng.randrange(256, limit) for _ in range(n)] for n in lengths]


def batch_lengths(num_requests: int, low: int, high: int) -> list[int]:
    rng = random.Random(1)
    return [rng.randint(low, high) for _ in range(num_requests)]


def cpu_busy(seconds: float = 1.0) -> float:
    """Fraction of the machine's CPU time that was busy over `seconds` (from /proc/stat); NaN elsewhere."""
    def sample():
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return float("nan")
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


QUIET: dict = {"max_wait": 0.0, "threshold": 0.15, "seen": []}


def wait_for_quiet() -> float:
    """Before a measurement, wait (up to QUIET['max_wait'] seconds) until other work leaves the CPUs mostly
    idle: with 2 threads on 2 cores, a core taken away stalls every parallel region (all three engines slow
    down several-fold). Returns the busy fraction seen last; a worker calls it before each timed run."""
    deadline = time.monotonic() + QUIET["max_wait"]
    busy = cpu_busy()
    while busy > QUIET["threshold"] and time.monotonic() < deadline:
        time.sleep(4.0)
        busy = cpu_busy()
    QUIET["seen"].append(busy)
    return busy


def process_memory() -> dict[str, int]:
    """This process's resident memory now (VmRSS) and at its highest so far (VmHWM), in bytes; {} off Linux."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in lines if line.startswith(("VmRSS:", "VmHWM:")))
    return {name: int(value.split()[0]) * 1024 for name, value in fields.items()}


def elapsed(fn) -> float:
    """Seconds `fn()` takes, started when the machine is quiet (see `wait_for_quiet`)."""
    wait_for_quiet()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def decode_by_difference(generate, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[int]]:
    """Decode tok/s from whole-generation timings: (new_tokens - 1) / (t(new_tokens) - t(1)), each t the best
    of `REPEATS`; `generate(prompt, n)` returns the generated ids. Takes `decode_prompts`' prompts."""
    generate(prompts[0], 4)  # warm-up
    first = min(elapsed(lambda p=p: generate(p, 1)) for p in prompts[1:1 + REPEATS])
    tokens: list[int] = []
    whole = min(elapsed(lambda p=p: tokens.extend(generate(p, new_tokens))) for p in prompts[1 + REPEATS:])
    return (new_tokens - 1) / (whole - first), tokens[:new_tokens]


def decode_prompts(model_dir: str, spec: dict) -> list[list[int]]:
    """A warm-up prompt, then `REPEATS` for timing one token, then `REPEATS` for timing them all (the first of
    these is the one whose tokens are compared across engines); all different, so no prefix cache helps."""
    return make_prompts(model_dir, [spec["decode_prompt"]] * (1 + 2 * REPEATS), seed=10)


def prefill_prompts(model_dir: str, spec: dict) -> list[list[int]]:
    """A 256-token warm-up prompt, then `REPEATS` different prompts of `prefill_len` tokens."""
    return make_prompts(model_dir, [256] + [spec["prefill_len"]] * REPEATS, seed=3)


# ---------------------------------------------------------------------- glm45
def run_glm45(model_dir: str, precision: str, threads: int, spec: dict) -> dict:
    import torch

    from benchmarks.models import split_precision
    from glm45 import LLM, SamplingParams

    torch.set_num_threads(threads)
    kwargs = dict(dtype="bfloat16", device="cpu", threads=threads, max_model_len=spec["max_model_len"],
                  kv_cache_memory_bytes=spec["kv_cache_bytes"], max_num_seqs=max(spec["num_requests"], 1),
                  num_speculative_tokens=spec.get("num_speculative_tokens", 0))
    if precision != "bf16":
        kwargs["quantization"], kwargs["lm_head_quantization"] = split_precision(precision)
    try:
        llm = LLM(model_dir, **kwargs)
    except (TypeError, ValueError) as e:
        if precision == "bf16":
            raise
        raise Unavailable(f"LLM(quantization={precision!r}): {e}") from e

    def generate(prompt: list[int], n: int) -> list[int]:
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        return list(llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0].token_ids)

    out: dict = {}
    with torch.inference_mode():
        for workload in spec["workloads"]:
            if workload == "decode":
                out["decode"], out["decode_tokens"] = decode_by_difference(generate, decode_prompts(model_dir, spec),
                                                                           spec["decode_len"])
            elif workload == "batch":
                prompts = make_prompts(model_dir, batch_lengths(spec["num_requests"], *spec["batch_prompt"]), 2)
                params = SamplingParams(temperature=0, max_tokens=spec["output_len"], ignore_eos=True)
                generate(prompts[0][:64], 4)
                seconds = elapsed(lambda: llm.generate([{"prompt_token_ids": p} for p in prompts], params,  # noqa: B023
                                                       use_tqdm=False))
                out["batch"] = len(prompts) * spec["output_len"] / seconds
            elif workload == "prefill":
                warm, *prompts = prefill_prompts(model_dir, spec)
                generate(warm, 1)
                out["prefill"] = max(len(p) / elapsed(lambda p=p: generate(p, 1)) for p in prompts)
            elif workload == "check" and "check_tokens" in spec:
                # teacher-forced, as the peers are: the reference's tokens appended to the prompt, each scored
                ids = spec["check_prompt"] + spec["check_tokens"]
                params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=CHECK_TOP)
                scored = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0].prompt_logprobs
                rows = scored[len(spec["check_prompt"]):]
                out["check"] = {"argmax": [max(row, key=row.get) for row in rows],
                                "logprobs": [{str(k): v for k, v in row.items()} for row in rows]}
            elif workload == "check":
                prompt = make_prompts(model_dir, [CHECK_PROMPT_LEN], seed=7)[0]
                params = SamplingParams(temperature=0, max_tokens=CHECK_TOKENS, ignore_eos=True, logprobs=CHECK_TOP)
                completion = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0]
                out["check"] = {"prompt": prompt, "tokens": list(completion.token_ids),
                                "logprobs": [{str(k): v for k, v in step.items()} for step in completion.logprobs]}
    return out


def _mtp_chats(model_dir: str, threads: int, spec: dict, k: int):
    """A function running one pass over the MTP chats (batch 1, greedy or seeded sampling, up to the end token) on
    the bundled model with k MTP drafts, loaded and warmed up → (generated tokens per second, the tokens)."""
    from glm45 import LLM, SamplingParams
    from glm45.chat import render_chat
    from glm45.grammar import StructuredOutputsParams, tool_call_constraint

    llm = LLM(model_dir, dtype="bfloat16", device="cpu", threads=threads, max_model_len=2048,
              num_speculative_tokens=k)
    sampled = spec.get("mtp_temperature", 0.0) > 0  # seeded, so every pass draws the same tokens
    constraint = spec.get("mtp_tool_constraint", "off")
    structured = None if constraint == "off" else StructuredOutputsParams(
        tool_calls=tool_call_constraint(spec["mtp_tools"], "auto", True, constraint))
    params = SamplingParams(temperature=spec.get("mtp_temperature", 0.0), top_p=spec.get("mtp_top_p", 1.0),
                            seed=0 if sampled else None, max_tokens=spec["mtp_max_tokens"],
                            structured_outputs=structured)
    prompts = [render_chat(messages, tools=spec["mtp_tools"], enable_thinking=thinking)
               for messages, thinking in spec["mtp_conversations"]]

    def one_pass() -> tuple[float, list[list[int]]]:
        start = time.perf_counter()
        tokens = [list(llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids) for prompt in prompts]
        return sum(map(len, tokens)) / (time.perf_counter() - start), tokens

    llm.generate(prompts[0], params, use_tqdm=False)  # warm-up
    return one_pass


def _mtp_figures(passes: list[tuple[float, list[list[int]]]]) -> dict:
    """One engine's figures from its passes: the best speed, the first pass's tokens, whether every pass agreed."""
    return {"mtp": max(speed for speed, _ in passes), "mtp_tokens": passes[0][1],
            "mtp_same_every_pass": all(tokens == passes[0][1] for _, tokens in passes)}


def run_glm45_mtp(model_dir: str, threads: int, spec: dict) -> dict:
    """The bundled model answering the MTP chats with `spec["num_speculative_tokens"]` drafts: generated tokens per
    second over all the chats (the best of `MTP_PASSES` passes; prompts repeat, so later passes reuse the prefix
    cache as a chat client would), and the tokens."""
    import torch

    torch.set_num_threads(threads)
    passes = []
    with torch.inference_mode():
        one_pass = _mtp_chats(model_dir, threads, spec, spec["num_speculative_tokens"])
        for _ in range(MTP_PASSES):
            wait_for_quiet()
            passes.append(one_pass())
    return _mtp_figures(passes)


def run_glm45_mtp_paired(model_dir: str, threads: int, spec: dict) -> dict:
    """k=0 and k=1 in one process, passes alternating (which one goes first alternates too): each pair of
    neighbouring passes meets the same spell of the machine, so their ratio is not the noise between processes.
    Per engine, as `run_glm45_mtp` (the best pass); and every pair's k=1 ÷ k=0."""
    import torch

    torch.set_num_threads(threads)
    passes: dict[int, list] = {0: [], 1: []}
    with torch.inference_mode():
        runs = {k: _mtp_chats(model_dir, threads, spec, k) for k in (0, 1)}
        for i in range(MTP_PASSES):
            wait_for_quiet()
            for k in ((0, 1) if i % 2 == 0 else (1, 0)):
                passes[k].append(runs[k]())
    out = {f"k{k}": _mtp_figures(p) for k, p in passes.items()}
    out["mtp_pair_ratios"] = [b[0] / a[0] for a, b in zip(passes[0], passes[1], strict=True)]
    return out


# ---------------------------------------------------------------------- transformers
def run_transformers(model_dir: str, threads: int, spec: dict) -> dict:
    import torch
    from transformers import Glm4MoeForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(threads)
    model = Glm4MoeForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()

    def generate(prompt: list[int], n: int) -> list[int]:
        ids = torch.tensor([prompt])
        result = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, pad_token_id=0)
        return result[0, len(prompt):].tolist()

    out: dict = {}
    with torch.inference_mode():
        for workload in spec["workloads"]:
            if workload == "decode":
                out["decode"], out["decode_tokens"] = decode_by_difference(generate, decode_prompts(model_dir, spec),
                                                                           spec["decode_len"])
            elif workload == "batch":
                prompts = make_prompts(model_dir, batch_lengths(spec["num_requests"], *spec["batch_prompt"]), 2)
                generate(prompts[0][:64], 4)
                seconds = 0.0
                for start in range(0, len(prompts), spec["batch_size"]):
                    group = prompts[start:start + spec["batch_size"]]
                    width = max(map(len, group))
                    ids = torch.tensor([[0] * (width - len(p)) + p for p in group])
                    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
                    seconds += elapsed(lambda ids=ids, mask=mask: model.generate(
                        ids, attention_mask=mask, max_new_tokens=spec["output_len"],
                        min_new_tokens=spec["output_len"], do_sample=False, pad_token_id=0))
                out["batch"] = len(prompts) * spec["output_len"] / seconds
            elif workload == "prefill":
                warm, *prompts = prefill_prompts(model_dir, spec)
                model(torch.tensor([warm]), logits_to_keep=1)
                out["prefill"] = max(len(p) / elapsed(lambda p=p: model(torch.tensor([p]), logits_to_keep=1))
                                     for p in prompts)
            elif workload == "check":
                ids = torch.tensor([spec["check_prompt"] + spec["check_tokens"][:-1]])
                logits = model(ids).logits[0, len(spec["check_prompt"]) - 1:].float()
                out["check"] = top_logprobs(logits.log_softmax(-1).numpy())
    return out


def top_logprobs(logprobs) -> dict:
    """Per position: the argmax and the log-probabilities of every token (as a list), for the parity check."""
    return {"argmax": [int(row.argmax()) for row in logprobs], "logprobs": [row.tolist() for row in logprobs]}


# ---------------------------------------------------------------------- llama.cpp
class LlamaCpp:
    """A GGUF model and one context, driven through llama.cpp's C API (as its `batched` example does)."""

    def __init__(self, gguf: str, threads: int, n_ctx: int, n_seq: int = 1, n_batch: int = 2048):
        import ctypes

        import llama_cpp
        import numpy as np

        self.lib, self.np, self.ctypes = llama_cpp, np, ctypes
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0
        self.model = llama_cpp.llama_model_load_from_file(gguf.encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_batch, min(512, n_batch)
        params.n_seq_max, params.n_threads, params.n_threads_batch = n_seq, threads, threads
        params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.n_batch = n_batch
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.sampler = llama_cpp.llama_sampler_init_greedy()

    def clear(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> list[int]:
        """Run (token, position, sequence, wants logits) entries, in `n_batch` pieces; returns, for each entry
        that wants logits, the greedy next token (in order)."""
        chosen = []
        for start in range(0, len(entries), self.n_batch):
            piece = entries[start:start + self.n_batch]
            self._run(piece)
            chosen += [self.lib.llama_sampler_sample(self.sampler, self.ctx, i)
                       for i, entry in enumerate(piece) if entry[3]]
        return chosen

    def _run(self, piece: list[tuple[int, int, int, bool]]) -> None:
        batch = self.batch
        for i, (token, pos, seq, logits) in enumerate(piece):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, logits
        batch.n_tokens = len(piece)
        if self.lib.llama_decode(self.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def logprobs(self, tokens: list[int]) -> list:
        """log-softmax rows for every position of `tokens` (one sequence from position 0)."""
        np = self.np
        self.clear()
        entries = [(t, i, 0, True) for i, t in enumerate(tokens)]
        rows = []
        for start in range(0, len(entries), self.n_batch):
            piece = entries[start:start + self.n_batch]
            self._run(piece)
            for i in range(len(piece)):
                pointer = self.lib.llama_get_logits_ith(self.ctx, i)
                row = np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).astype(np.float64)
                row = row - row.max()
                rows.append(row - np.log(np.exp(row).sum()))
        return rows


def run_llama_cpp(gguf: str, model_dir: str, threads: int, spec: dict) -> dict:
    out: dict = {}
    workloads = spec["workloads"]
    if any(w in workloads for w in ("decode", "prefill", "check")):
        llm = LlamaCpp(gguf, threads, n_ctx=max(spec["prefill_len"], spec["decode_prompt"] + spec["decode_len"]) + 64)
        for workload in workloads:
            if workload == "decode":
                prompts = decode_prompts(model_dir, spec)
                llama_generate(llm, prompts[0], 4)  # warm-up
                runs = [llama_generate(llm, p, spec["decode_len"]) for p in prompts[1 + REPEATS:]]
                out["decode"], out["decode_tokens"] = max(speed for speed, _ in runs), runs[0][1]
            elif workload == "prefill":
                warm, *prompts = prefill_prompts(model_dir, spec)
                llama_generate(llm, warm, 1)
                out["prefill"] = max(len(p) / llama_prefill(llm, p) for p in prompts)
            elif workload == "check":
                rows = llm.logprobs(spec["check_prompt"] + spec["check_tokens"][:-1])
                out["check"] = top_logprobs(rows[len(spec["check_prompt"]) - 1:])
    if "batch" in workloads:
        seqs, per_seq = spec["batch_size"], spec["batch_prompt"][1] + spec["output_len"] + 16
        llm = LlamaCpp(gguf, threads, n_ctx=seqs * per_seq, n_seq=seqs)
        prompts = make_prompts(model_dir, batch_lengths(spec["num_requests"], *spec["batch_prompt"]), 2)
        llama_generate(llm, prompts[0][:64], 4)
        wait_for_quiet()
        start = time.perf_counter()
        for first in range(0, len(prompts), seqs):
            llama_batched(llm, prompts[first:first + seqs], spec["output_len"])
        out["batch"] = len(prompts) * spec["output_len"] / (time.perf_counter() - start)
    return out


def llama_generate(llm: LlamaCpp, prompt: list[int], n: int) -> tuple[float, list[int]]:
    """Greedy `n` tokens after `prompt` on sequence 0; returns (tok/s of the n-1 tokens after the first, ids)."""
    wait_for_quiet()
    llm.clear()
    tokens = llm.decode([(t, i, 0, i == len(prompt) - 1) for i, t in enumerate(prompt)])
    start = time.perf_counter()
    for step in range(n - 1):
        tokens += llm.decode([(tokens[-1], len(prompt) + step, 0, True)])
    seconds = time.perf_counter() - start
    return (n - 1) / seconds if n > 1 else 0.0, tokens


def llama_prefill(llm: LlamaCpp, prompt: list[int]) -> float:
    """Seconds from an empty cache to the last prompt token's greedy next token."""
    llm.clear()
    entries = [(t, i, 0, i == len(prompt) - 1) for i, t in enumerate(prompt)]
    return elapsed(lambda: llm.decode(entries))


def llama_batched(llm: LlamaCpp, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Greedy `n` tokens for each prompt, one sequence each: packed prefill, then one token per sequence a step."""
    llm.clear()
    entries = [(t, i, seq, i == len(p) - 1) for seq, p in enumerate(prompts) for i, t in enumerate(p)]
    outputs = [[t] for t in llm.decode(entries)]
    for step in range(n - 1):
        chosen = llm.decode([(out[-1], len(p) + step, seq, True)
                             for seq, (p, out) in enumerate(zip(prompts, outputs, strict=True))])
        for out, token in zip(outputs, chosen, strict=True):
            out.append(token)
    return outputs
