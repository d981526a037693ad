"""The captured CPU step's decode attention (`op_attn` in glm45/kernels/csrc/program.c) alone, on a paged bf16 cache,
at the head shapes of the bundled model, the Air-shaped benchmark model and GLM-4.5-Air, optionally against the same
op of another commit's kernels built beside it.

    python benchmarks/bench_attention.py [--threads 2] [--repeats 5] [--baseline REV]

Prints the median time per call (microseconds) with its range over the repeats, interleaving the two builds. A
baseline is built from `git show REV:glm45/kernels/csrc/*` with the flags glm45 uses for this CPU; kernels from
before the attention scratch was a tile take a [threads, group, context] score buffer instead, which is passed when
the build has no `glm45_attention_scratch`. The two outputs' largest difference is printed too.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from glm45.engine import cpu_program as ops  # noqa: E402
from glm45.kernels import cpu  # noqa: E402

# (label, query heads, KV heads, head dim, keys, rows of one sequence)
SHAPES = [
    ("bundled 4/2×64", 4, 2, 64, 600, 1),
    ("bundled, MTP k=1 verification", 4, 2, 64, 600, 2),
    ("Air-shaped 8/2×128", 8, 2, 128, 600, 1),
    ("Air-shaped 8/2×128", 8, 2, 128, 4096, 1),
    ("Air-shaped, a 64-row prefill chunk", 8, 2, 128, 600, 64),
    ("GLM-4.5-Air 96/8×128", 96, 8, 128, 4096, 1),
    ("GLM-4.5-Air 96/8×128", 96, 8, 128, 16384, 1),
    ("one KV head 12/1×128", 12, 1, 128, 16384, 1),
]


def build_baseline(rev: str) -> ctypes.CDLL:
    """The kernels of commit `rev`, compiled like glm45's own for this CPU's best instruction set."""
    folder = Path(tempfile.mkdtemp(prefix="glm45-attention-baseline-"))
    names = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", rev, "glm45/kernels/csrc/"],
                           capture_output=True, text=True, check=True).stdout.split()
    for name in names:
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{name}"], capture_output=True, check=True)
        (folder / Path(name).name).write_bytes(source.stdout)
    isa = "avx512" if all(f in cpu.cpu_features() for f in cpu.AVX512_FEATURES) else "avx2"
    target = folder / "baseline.so"
    subprocess.run(["cc", "-O3", *cpu.ISA_FLAGS[isa], "-fopenmp", "-shared", "-fPIC", "-I", str(folder),
                    *map(str, sorted(folder.glob("*.c"))), "-o", str(target), "-lm"], check=True)
    lib = ctypes.CDLL(str(target))
    lib.glm45_run_program.argtypes = cpu.library().glm45_run_program.argtypes
    return lib


def attention_op(lib, heads, kv_heads, dim, keys, rows, threads):
    """(program, output) of one OP_ATTN over a bf16 cache: `rows` consecutive positions of one sequence."""
    block = 16
    blocks = -(-(keys + rows) // block)
    generator = torch.Generator().manual_seed(0)
    k_cache = torch.randn(blocks * block, kv_heads, dim, generator=generator).bfloat16()
    v_cache = torch.randn(blocks * block, kv_heads, dim, generator=generator).bfloat16()
    width = (heads + 2 * kv_heads) * dim
    qkv = torch.randn(rows, width, generator=generator).bfloat16().float()
    tables = torch.arange(blocks, dtype=torch.int32).repeat(rows, 1)
    lengths = torch.arange(keys, keys + rows, dtype=torch.int32)
    out = torch.zeros(rows, heads * dim)
    if hasattr(lib, "glm45_attention_scratch"):
        lib.glm45_attention_scratch.argtypes = [ctypes.c_int64, ctypes.c_int64]
        lib.glm45_attention_scratch.restype = ctypes.c_int64
        scratch = torch.zeros(threads, lib.glm45_attention_scratch(dim, heads // kv_heads))
        per_thread = scratch.shape[1]
    else:
        scratch = torch.zeros(threads, heads // kv_heads, keys + rows + block)
        per_thread = scratch.shape[2]
    program = ops.Program()
    program.add(ops.OP_ATTN, (qkv, k_cache, v_cache, tables, lengths, out, scratch),
                (rows, heads, kv_heads, dim, block, blocks, width, heads * dim, ops.KV_DTYPES[torch.bfloat16],
                 per_thread), (dim ** -0.5,))
    program.finish()
    return program, out


def seconds_per_call(lib, program, threads: int, calls: int) -> float:
    for _ in range(3):
        lib.glm45_run_program(program.array, len(program.ops), 1, threads)
    start = time.perf_counter()
    for _ in range(calls):
        lib.glm45_run_program(program.array, len(program.ops), 1, threads)
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline", help="a git revision whose kernels to time beside this checkout's")
    args = parser.parse_args()
    current = cpu.library()
    if current is None:
        sys.exit("the CPU kernels are not available here (no C compiler, or no AVX2)")
    builds = {"this checkout": current}
    if args.baseline:
        builds = {args.baseline: build_baseline(args.baseline), **builds}
    print(f"decode attention op, bf16 cache, {args.threads} threads, median (range) of {args.repeats} in µs")
    for label, heads, kv_heads, dim, keys, rows in SHAPES:
        ops_of = {name: attention_op(lib, heads, kv_heads, dim, keys, rows, args.threads)
                  for name, lib in builds.items()}
        calls = max(3, 30_000 // (keys * rows))
        times = {name: [] for name in builds}
        for _ in range(args.repeats):
            for name, lib in builds.items():
                times[name].append(seconds_per_call(lib, ops_of[name][0], args.threads, calls) * 1e6)
        cells = [f"{name} {statistics.median(t):9.1f} ({min(t):.1f}–{max(t):.1f})" for name, t in times.items()]
        line = f"{label:36s} {keys:6d} keys {rows:3d} rows: " + "   ".join(cells)
        if args.baseline:
            old, new = (statistics.median(times[name]) for name in builds)
            outputs = [out for _, out in ops_of.values()]
            line += f"   {old / new:.2f}×, outputs differ by ≤ {(outputs[0] - outputs[1]).abs().max().item():.1e}"
        print(line)


if __name__ == "__main__":
    main()
