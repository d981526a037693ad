"""Serving LoRA adapters per request: decode time of a batch whose requests use 4 different adapters, against the base.

    python benchmarks/bench_lora.py                     # the bundled model, batch 8, 4 adapters of rank 16
    python benchmarks/bench_lora.py --targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj

Two engines (captured decode step, and `enforce_eager`) serve everything. Each round generates `--output-len` tokens
for `--batch` requests four ways, rounds interleaved: the base model and the same batch spread over 4 adapters (2
requests each at batch 8), each on both engines. It prints the median decode time per step of each (range in
brackets) and the adapters' cost as a multiple of the base's on the same engine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glm45 import LLM, LoRARequest, SamplingParams  # noqa: E402
from glm45.config import bundled_model_path  # noqa: E402
from glm45.model import Glm4MoeForCausalLM  # noqa: E402
from glm45.train.lora import apply_lora  # noqa: E402
from glm45.train.lora_io import save_adapter  # noqa: E402


def make_adapters(base: Path, folder: Path, count: int, rank: int, targets: list[str]) -> list[LoRARequest]:
    requests = []
    for i in range(count):
        model = Glm4MoeForCausalLM.from_pretrained(base, dtype=torch.float32, progress=False)
        apply_lora(model, rank=rank, alpha=2.0 * rank, targets=targets)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.01, generator=torch.Generator().manual_seed(i))
        path = save_adapter(model, folder / f"adapter{i}", rank, 2.0 * rank, targets)
        requests.append(LoRARequest(f"adapter{i}", i + 1, str(path)))
    return requests


def timed(llm: LLM, prompts, params, loras) -> float:
    """Seconds per decode step: the time of the whole generation minus a 1-token run of the same prompts (prefill),
    over the remaining steps."""
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    start = time.perf_counter()
    llm.generate(prompts, one, use_tqdm=False, lora_request=loras)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
    return (time.perf_counter() - start - prefill) / (params.max_tokens - 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Decode time with 4 LoRA adapters in one batch vs the base model.")
    parser.add_argument("--model", default=str(bundled_model_path()))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        loras = make_adapters(Path(args.model), Path(tmp), args.adapters, args.rank, args.targets.split(","))
        llm = LLM(args.model, enable_lora=True, max_loras=args.adapters, max_lora_rank=args.rank)
        eager = LLM(args.model, enable_lora=True, max_loras=args.adapters, max_lora_rank=args.rank, enforce_eager=True)
        prompts = [{"prompt_token_ids": [10 + i, 20 + i, 30 + i, 40 + i] * 4} for i in range(args.batch)]
        params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
        mixed = [loras[i % len(loras)] for i in range(args.batch)]
        runs = {"base (captured step)": (llm, None), "base (eager)": (eager, None),
                f"{args.adapters} adapters (captured step)": (llm, mixed),
                f"{args.adapters} adapters (eager)": (eager, mixed)}
        for engine, lora in runs.values():  # warm-up: kernels, captured step, every adapter loaded
            count = len(loras) if lora else 2
            timed(engine, prompts[:count], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                  lora[:count] if lora else None)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, (engine, lora) in runs.items():
                times[name].append(timed(engine, prompts, params, lora))
    print(f"{args.model}: batch {args.batch}, {args.output_len} tokens, {args.adapters} adapters of rank {args.rank} "
          f"on {args.targets}, {args.threads} threads, {args.rounds} rounds")
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"  {name:28s} {medians[name] * 1e3:7.2f} ms/step  [{min(t) * 1e3:.2f} – {max(t) * 1e3:.2f}]")
    captured, eager = medians[f"{args.adapters} adapters (captured step)"], medians[f"{args.adapters} adapters (eager)"]
    print(f"  adapters / base, captured steps: {captured / medians['base (captured step)']:.2f}×;  "
          f"eager steps: {eager / medians['base (eager)']:.2f}×")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
