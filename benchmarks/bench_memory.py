"""Resident memory after load, per weight format, against bf16: the memory table of issue 16.

    python benchmarks/bench_memory.py                      # the Air-shaped benchmark model, 3 rounds
    python benchmarks/bench_memory.py --model small --rounds 1
    python benchmarks/bench_memory.py --formats bf16,int4,int4:int8   # W:H: the LM heads in H

Each load runs in a fresh process (`LLM(model, quantization=...)` with a 32 MiB KV cache, so the cache does not
hide the weights), interleaved over rounds. Per format it prints the process's resident-memory growth across
`LLM(...)` (VmRSS), its peak during the load (VmHWM), and the bytes of every tensor the process then holds (the
packed weights, the KV cache, the captured step's buffers), each as a median with its range and as a fraction of
bf16's. On a 0.6B model the fixed part of the RSS (tokenizer, kernels, allocator) is a large share, which it is
not on GLM-4.5-Air; the tensor column is the part that scales with the model. The checkpoint is the one
`bench_peers.py` writes (`--workdir`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FORMATS = ("bf16", "int8", "int4", "fp8")
TARGETS = {"int8": 0.55, "fp8": 0.55, "int4": 0.32}
MODELS = {"air": "air-0.6b", "small": "small"}


def measure(model_dir: str, fmt: str, threads: int) -> dict:
    """In this (fresh) process: load, then report the memory figures in bytes."""
    import torch

    from benchmarks.peer_workers import process_memory
    from glm45 import LLM

    torch.set_num_threads(threads)
    before = process_memory()
    from benchmarks.models import split_precision

    weights, head = split_precision(fmt)
    kwargs = {} if fmt == "bf16" else {"quantization": weights, "lm_head_quantization": head}
    llm = LLM(model_dir, dtype="bfloat16", device="cpu", threads=threads, max_model_len=1024,
              kv_cache_memory_bytes=32 << 20, **kwargs)
    gc.collect()
    after = process_memory()
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return {"rss": after["VmRSS"] - before["VmRSS"], "peak": after["VmHWM"] - before["VmRSS"],
            "tensors": sum(storages.values()), "weights": llm.engine.stats()["weight_bytes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="air")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--formats", default=",".join(FORMATS),
                        help="weight formats, bf16 first; W:H for weights in W with the LM heads in H")
    parser.add_argument("--workdir", default=str(Path.home() / ".cache" / "glm45-bench"))
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker[0], args.worker[1], args.threads)))
        return
    model_dir = Path(args.workdir) / MODELS[args.model]
    if not (model_dir / "config.json").is_file():
        sys.exit(f"no checkpoint at {model_dir}: run benchmarks/bench_peers.py once (it writes the models)")
    formats = [f for f in args.formats.split(",") if f]
    if formats[0] != "bf16":
        sys.exit("--formats must begin with bf16 (the ratios' base)")
    runs: dict[str, list[dict]] = {fmt: [] for fmt in formats}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    for _ in range(args.rounds):
        for fmt in formats:
            out = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--worker",
                                  str(model_dir), fmt], capture_output=True, text=True, env=env, check=True)
            runs[fmt].append(json.loads(out.stdout.strip().splitlines()[-1]))
    medians = {fmt: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for fmt, rs in runs.items()}
    print(f"resident memory after load, {args.model} ({model_dir}), median and range of {args.rounds} fresh "
          f"process(es) per format; ratios to bf16's median\n")
    print("| format | RSS growth MiB | ÷ bf16 | tensors held MiB | ÷ bf16 | target | peak during load MiB | "
          "weights MiB (engine) |")
    print("|---|---:|---:|---:|---:|---|---:|---:|")
    for fmt in formats:
        m, base = medians[fmt], medians["bf16"]

        def spread(key, fmt=fmt, m=m):
            values = [r[key] / 2**20 for r in runs[fmt]]
            return f"{m[key] / 2**20:.0f} ({min(values):.0f}–{max(values):.0f})"

        goal = TARGETS.get(fmt)
        ratio_rss, ratio_tensors = m["rss"] / base["rss"], m["tensors"] / base["tensors"]
        target = "" if goal is None else (f"≤ {goal}: RSS {'met' if ratio_rss <= goal else 'not met'}, tensors "
                                          f"{'met' if ratio_tensors <= goal else 'not met'}")
        print(f"| {fmt} | {spread('rss')} | {ratio_rss:.2f} | {spread('tensors')} | {ratio_tensors:.2f} | {target} | "
              f"{spread('peak')} | {m['weights'] / 2**20:.0f} |")


if __name__ == "__main__":
    main()
