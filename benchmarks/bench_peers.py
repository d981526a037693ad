"""glm45 against llama.cpp and transformers on the same weights, in one run: the peer benchmark.

    python benchmarks/bench_peers.py                    # small + air, bf16/int8/int4/fp8, 3 rounds, 2 threads
    python benchmarks/bench_peers.py --quick            # small, bf16, 1 round, short workloads (a few minutes)
    python benchmarks/bench_peers.py --threads 1,2 --workloads decode --precisions bf16   # thread scaling

Models are random-weight checkpoints of the GLM-4.5 architecture (`benchmarks/models.py`: `small`, 71.5M
parameters; `air`, the Air-shaped 0.97B with its MTP layer, 0.63B without), written once under `--workdir`.
llama.cpp gets the same weights as GGUF files made by its own converter (bf16) and quantizer (Q8_0, Q4_K_M),
see `gguf_export.py`. Precisions pair up as bf16 ↔ llama.cpp BF16 ↔ transformers bf16, int8 ↔ Q8_0,
int4 ↔ Q4_K_M; fp8 is glm45 alone (against its bf16). `int4:int8` (int4 weights, int8 LM heads: the mix
closest to Q4_K_M, which keeps its output matrix in Q6_K) meets Q4_K_M too, which then runs once for each.
glm45's `quantization=` is optional: if `LLM` refuses it, the row reads "n/a".

Every engine runs in its own process (this script with `--worker`), one process per engine, model, precision
and round, loading the model once for its workloads (`peer_workers.py` says what each measures). Rounds are
interleaved — round r runs glm45, llama.cpp, transformers for each model and precision before round r+1 — so
noise from a shared machine falls on all engines alike; the table gives the median and the range over rounds.

Floors: read bandwidth with the given threads (`floors.read_bandwidth`: 512 MiB, best of five, best over rounds);
a batch-1 decode step must read its weights once (`models.decode_bytes_per_token`: every matrix but the
unchosen routed experts, the LM head included, at the precision's bytes per weight with scales), so
bandwidth / bytes is the floor in tokens per second. For bf16 prefill and batches, the floor is the
workload's matmul and attention FLOPs at the best measured GEMM rate (torch, fp32 or bf16, 2048³).

Before the rounds, a parity check: glm45 bf16's greedy tokens on a short prompt are fed to every other engine
(teacher forcing), which must pick the same argmax with log-probabilities close to glm45's. A conversion
mistake (expert layout, correction bias, routed scaling) shows there as a large difference.

Needs `pip install -e .[bench]` for llama.cpp (llama-cpp-python builds llama.cpp from source: ~15 minutes)
and transformers for its rows; without either, its rows are skipped with one line saying why.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import peer_workers  # noqa: E402
from benchmarks.peer_workers import QUIET, wait_for_quiet  # noqa: E402
from benchmarks.report import median_range, print_report  # noqa: E402

MODELS = {"small": "small", "air": "air-0.6b"}
PRECISIONS = ("bf16", "int8", "int4", "fp8", "int4:int8")  # W:H is weights in W, the LM heads in H
DEFAULT_PRECISIONS = PRECISIONS[:4]
GGUF_OF = {"bf16": "BF16", "int8": "Q8_0", "int4": "Q4_K_M", "int4:int8": "Q4_K_M"}  # the llama.cpp file each meets
WORKLOAD_LABELS = {"decode": "decode bs=1", "batch": "{n} req × {out}", "prefill": "prefill {n}",
                   "mtp": "MTP chat bs=1"}
MTP_TOOLS = [{"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {
    p: {"type": "string"} for p in params}}}} for name, params in (
    ("get_weather", ("city", "unit")), ("convert_units", ("value", "from_unit", "to_unit")))]
MTP_CONVERSATIONS = [
    ([{"role": "user", "content": "What is the weather in Paris in celsius?"}], True),
    ([{"role": "user", "content": "Convert 12 kilometers to miles."}], True),
    ([{"role": "user", "content": "What is 17 * 23?"}], False),
    ([{"role": "user", "content": "Tell me something about Berlin."}], True),
]
RESULT_MARK = "BENCH_RESULT "


# ---------------------------------------------------------------------- running workers
def run_worker(kind: str, threads: int, timeout: float, **options) -> dict:
    """Run this script as `--worker kind` in a fresh process; returns its JSON result, or {'error': ...}."""
    options.setdefault("quiet_wait", QUIET["max_wait"])
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--threads", str(threads),
               "--worker-options", json.dumps(options)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(result.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    tail = (result.stderr.strip().splitlines() or ["(no output)"])[-6:]
    return {"error": f"exit {result.returncode}: " + " | ".join(tail)}


def worker_main(kind: str, threads: int, options: dict) -> None:
    """The `--worker` side: run one engine's measurements and print them as one JSON line."""
    QUIET["max_wait"] = options.get("quiet_wait", 0.0)
    try:
        if kind == "glm45":
            out = peer_workers.run_glm45(options["model_dir"], options["precision"], threads, options["spec"])
        elif kind == "glm45-mtp":
            out = peer_workers.run_glm45_mtp(options["model_dir"], threads, options["spec"])
        elif kind == "glm45-mtp-paired":
            out = peer_workers.run_glm45_mtp_paired(options["model_dir"], threads, options["spec"])
        elif kind == "llama.cpp":
            out = peer_workers.run_llama_cpp(options["gguf"], options["model_dir"], threads, options["spec"])
        elif kind == "transformers":
            out = peer_workers.run_transformers(options["model_dir"], threads, options["spec"])
        elif kind == "floors":
            out = measure_floors(threads)
        elif kind == "prepare":
            out = prepare_model(options)
        else:
            raise ValueError(f"unknown worker {kind!r}")
    except peer_workers.Unavailable as e:
        out = {"unavailable": str(e)}
    if QUIET["seen"]:
        out["busy_max"] = max(QUIET["seen"])
    print(RESULT_MARK + json.dumps(out), flush=True)


def measure_floors(threads: int) -> dict:
    import torch

    from benchmarks.floors import read_bandwidth

    bandwidth = read_bandwidth(threads)
    gemm = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(2048, 2048).to(dtype), torch.randn(2048, 2048).to(dtype)
        best = 0.0
        for _ in range(3):
            start = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * 2048**3 / (time.perf_counter() - start))
        gemm[str(dtype).removeprefix("torch.")] = best
    return {"bandwidth": bandwidth, "gemm": gemm}


def prepare_model(options: dict) -> dict:
    """Checkpoint (+ tokenizer) and the GGUF files of one benchmark model, made once under the workdir."""
    from benchmarks.gguf_export import convert_to_gguf, gguf_tensor_types, llama_cpp_source, quantize_gguf
    from benchmarks.models import build_random_checkpoint
    from benchmarks.synthetic_tokenizer import add_synthetic_tokenizer

    work = Path(options["workdir"])
    folder = build_random_checkpoint(options["shape"], work / options["shape"], perturb=True)
    add_synthetic_tokenizer(folder)
    out: dict = {"model_dir": str(folder), "gguf": {}, "gguf_tensors": {}}
    if options["llama_cpp"]:
        src = llama_cpp_source(work, options.get("llama_cpp_src"), options.get("llama_cpp_sdist"))
        bf16 = convert_to_gguf(folder, work / f"{options['shape']}-BF16.gguf", src)
        out["gguf"]["BF16"] = str(bf16)
        for quant in options["quants"]:
            out["gguf"][quant] = str(quantize_gguf(bf16, work / f"{options['shape']}-{quant}.gguf", quant, 2))
        for name, path in out["gguf"].items():
            out["gguf_tensors"][name] = gguf_tensor_types(Path(path))
    return out


# ---------------------------------------------------------------------- the run
def engines_for(precision: str, have_llama: bool, have_hf: bool) -> list[str]:
    engines = ["glm45"]
    if precision in GGUF_OF and have_llama:
        engines.append(f"llama.cpp {GGUF_OF[precision]}")
    if precision == "bf16" and have_hf:
        engines.append("transformers")
    return engines


def check_optional(args) -> tuple[bool, bool]:
    have_llama = have_hf = False
    if not args.no_llama_cpp:
        try:
            import llama_cpp  # noqa: F401

            have_llama = True
        except (ImportError, OSError) as e:
            print(f"llama.cpp rows skipped: llama_cpp is not importable ({e}); pip install -e .[bench]")
    if importlib.util.find_spec("transformers") is None:
        print("transformers rows skipped: transformers is not installed")
        if have_llama:
            print("llama.cpp rows skipped: llama.cpp's convert_hf_to_gguf.py needs transformers")
            have_llama = False
    else:
        have_hf = True
    return have_llama, have_hf


def parity_check(name: str, prep: dict, args, spec: dict, have_llama: bool, have_hf: bool, record: dict) -> None:
    """glm45 bf16's greedy tokens teacher-forced through the other engines and glm45's quantized runs."""
    check = dict(spec, workloads=["check"])
    ref = run_worker("glm45", args.threads[-1], args.worker_timeout, model_dir=prep["model_dir"],
                     precision="bf16", spec=check)
    if "check" not in ref:
        print(f"  {name}: parity check failed to run glm45: {ref}")
        return
    ref = ref["check"]
    forced = dict(check, check_prompt=ref["prompt"], check_tokens=ref["tokens"])
    others: list[tuple[str, dict]] = []
    if have_llama:
        for label in ["BF16"] + [GGUF_OF[p] for p in args.precisions if p in GGUF_OF and p != "bf16"]:
            if label in prep["gguf"]:
                others.append((f"llama.cpp {label}", run_worker("llama.cpp", args.threads[-1], args.worker_timeout,
                                                                gguf=prep["gguf"][label], model_dir=prep["model_dir"],
                                                                spec=forced)))
    if have_hf:
        others.append(("transformers", run_worker("transformers", args.threads[-1], args.worker_timeout,
                                                  model_dir=prep["model_dir"], spec=forced)))
    n = len(ref["tokens"])
    for label, result in others:
        if "check" not in result:
            print(f"  {name:<6} {label:<18} did not run: {shorten(result.get('error') or result.get('unavailable'))}")
            continue
        got = result["check"]
        agree = sum(a == b for a, b in zip(got["argmax"], ref["tokens"], strict=True))
        deltas = [abs(got["logprobs"][step][int(tok)] - lp) for step, top in enumerate(ref["logprobs"])
                  for tok, lp in top.items()]
        summary = {"argmax_agree": agree, "of": n, "max_dlogprob": max(deltas),
                   "mean_dlogprob": statistics.fmean(deltas)}
        record.setdefault(name, {})[label] = summary
        print(f"  {name:<6} {label:<18} argmax {agree}/{n} (teacher-forced), |Δ log-prob| over glm45's top-20: "
              f"max {summary['max_dlogprob']:.3f}, mean {summary['mean_dlogprob']:.4f}")
    for precision in args.precisions:
        if precision == "bf16":
            continue
        result = run_worker("glm45", args.threads[-1], args.worker_timeout, model_dir=prep["model_dir"],
                            precision=precision, spec=forced)
        if "check" not in result:
            reason = result.get("unavailable") or result.get("error")
            print(f"  {name:<6} glm45 {precision:<12} n/a ({shorten(reason)})")
            record.setdefault(name, {})[f"glm45 {precision}"] = {"unavailable": reason}
            continue
        got = result["check"]
        agree = sum(a == b for a, b in zip(got["argmax"], ref["tokens"], strict=True))
        # prompt log-probabilities carry glm45's own top 20 (and the scored token): compare where both have a token
        deltas = [abs(got["logprobs"][step][tok] - lp) for step, top in enumerate(ref["logprobs"])
                  for tok, lp in top.items() if tok in got["logprobs"][step]]
        summary = {"argmax_agree": agree, "of": n, "max_dlogprob": max(deltas, default=float("nan")),
                   "mean_dlogprob": statistics.fmean(deltas) if deltas else float("nan")}
        record.setdefault(name, {})[f"glm45 {precision}"] = summary
        print(f"  {name:<6} glm45 {precision:<12} argmax {agree}/{n} (teacher-forced), |Δ log-prob| over the top-20 "
              f"both have: max {summary['max_dlogprob']:.3f}, mean {summary['mean_dlogprob']:.4f}")


def make_spec(args) -> dict:
    return {
        "decode_prompt": args.decode_prompt, "decode_len": args.decode_len, "num_requests": args.num_requests,
        "output_len": args.output_len, "batch_prompt": [args.batch_min_prompt, args.batch_max_prompt],
        "batch_size": args.batch_size, "prefill_len": args.prefill_len,
        "max_model_len": max(args.prefill_len, args.batch_max_prompt + args.output_len,
                             args.decode_prompt + args.decode_len) + 64,
        "kv_cache_bytes": 2 << 30,
        "mtp_max_tokens": args.mtp_max_tokens, "mtp_tools": MTP_TOOLS,
        "mtp_temperature": args.mtp_temperature, "mtp_top_p": args.mtp_top_p,
        "mtp_tool_constraint": args.mtp_tool_constraint,
        "mtp_conversations": MTP_CONVERSATIONS[:args.mtp_conversations],
    }


def workload_label(workload: str, args) -> str:
    return WORKLOAD_LABELS[workload].format(n=args.num_requests if workload == "batch" else args.prefill_len,
                                            out=args.output_len)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma list of: small, air (default: both; --quick: small)")
    parser.add_argument("--precisions", help="comma list of: bf16, int8, int4, fp8, int4:int8 (default: the first "
                        "four; --quick: bf16)")
    parser.add_argument("--workloads", default="decode,batch,prefill,mtp",
                        help="comma list of: decode, batch, prefill, mtp (the bundled model, k=0 vs k=1)")
    parser.add_argument("--batch-precisions", default="bf16",
                        help="precisions that also run the batch workload (it is the longest)")
    parser.add_argument("--rounds", type=int, help="default 3; --quick: 1")
    parser.add_argument("--threads", default="2", help="threads per engine; a comma list (1,2) reports scaling")
    parser.add_argument("--quick", action="store_true", help="small model, bf16, 1 round, short workloads")
    parser.add_argument("--decode-prompt", type=int, default=64)
    parser.add_argument("--decode-len", type=int, default=128)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--batch-min-prompt", type=int, default=64)
    parser.add_argument("--batch-max-prompt", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16, help="transformers' static batch; llama.cpp's sequences")
    parser.add_argument("--prefill-len", type=int, default=2048)
    parser.add_argument("--mtp-max-tokens", type=int, default=128)
    parser.add_argument("--mtp-conversations", type=int, default=4)
    parser.add_argument("--mtp-temperature", type=float, default=0.0,
                        help="above 0: the MTP chats are sampled (seeded), with --mtp-top-p")
    parser.add_argument("--mtp-top-p", type=float, default=1.0)
    parser.add_argument("--mtp-paired", action="store_true",
                        help="k=0 and k=1 in one process per round, passes alternating: the ratio of neighbouring "
                             "passes, free of the noise between processes (each figure is still the best pass)")
    parser.add_argument("--mtp-tool-constraint", choices=("off", "name", "full"), default="off",
                        help="the MTP chats under the server's tool-call constraint (`glm45 serve "
                             "--tool-call-constraint`), as a chat request with tools gets it")
    parser.add_argument("--no-parity", action="store_true", help="skip the cross-engine parity check")
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--workdir", default=str(Path.home() / ".cache" / "glm45-bench"),
                        help="where checkpoints, GGUF files and llama.cpp's converter are kept between runs")
    parser.add_argument("--llama-cpp-src", help="a llama.cpp source tree (for convert_hf_to_gguf.py)")
    parser.add_argument("--llama-cpp-sdist", help="llama-cpp-python's sdist (.tar.gz) to take the converter from")
    parser.add_argument("--json-out", help="write every raw figure here")
    parser.add_argument("--worker-timeout", type=float, default=3600)
    parser.add_argument("--quiet-wait", type=float, default=180,
                        help="before each measurement, wait up to this many seconds for other jobs to leave the "
                             "CPUs idle (below 15%% busy); 0 to start at once")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-options", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        worker_main(args.worker, int(args.threads), json.loads(args.worker_options))
        return
    if args.quick:
        args.models = args.models or "small"
        args.rounds = 1 if args.rounds is None else args.rounds
        args.precisions = args.precisions or "bf16"
        args.decode_len, args.num_requests, args.output_len = 32, 16, 32
        args.batch_max_prompt, args.prefill_len, args.mtp_max_tokens, args.mtp_conversations = 256, 512, 32, 2
    QUIET["max_wait"] = args.quiet_wait
    args.rounds = 3 if args.rounds is None else args.rounds
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    args.models = [m for m in (args.models or ",".join(MODELS)).split(",") if m]
    args.precisions = [p for p in (args.precisions or ",".join(DEFAULT_PRECISIONS)).split(",") if p]
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.batch_precisions = [p for p in args.batch_precisions.split(",") if p]
    args.threads = sorted(int(t) for t in str(args.threads).split(","))
    for value, allowed, what in ((args.models, MODELS, "--models"), (args.precisions, PRECISIONS, "--precisions"),
                                 (args.workloads, WORKLOAD_LABELS, "--workloads")):
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            parser.error(f"{what}: unknown {unknown}; allowed: {sorted(allowed)}")
    run(args)


def run(args) -> None:
    started = time.time()
    have_llama, have_hf = check_optional(args)
    spec = make_spec(args)
    quants = list(dict.fromkeys(GGUF_OF[p] for p in args.precisions if p in GGUF_OF and p != "bf16"))
    record: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "args": {
        k: v for k, v in vars(args).items() if not k.startswith("worker")}, "machine": machine_info(),
        "floors": [], "results": [], "parity": {}, "prepared": {}}

    print(f"preparing checkpoints and GGUF files under {args.workdir} …")
    for name in args.models:
        prep = run_worker("prepare", 2, args.worker_timeout, workdir=args.workdir, shape=MODELS[name],
                          llama_cpp=have_llama, quants=quants, llama_cpp_src=args.llama_cpp_src,
                          llama_cpp_sdist=args.llama_cpp_sdist)
        if "error" in prep:
            raise SystemExit(f"could not prepare {name}: {prep['error']}")
        record["prepared"][name] = prep
    if not args.no_parity and any(w != "mtp" for w in args.workloads):
        print("parity on the same weights (glm45 bf16's 32 greedy tokens after a 16-token prompt):")
        for name in args.models:
            parity_check(name, record["prepared"][name], args, spec, have_llama, have_hf, record["parity"])

    model_workloads = [w for w in args.workloads if w != "mtp"]
    for round_index in range(args.rounds):
        print(f"round {round_index + 1}/{args.rounds} (load average {os.getloadavg()[0]:.1f})")
        for threads in args.threads:
            wait_for_quiet()
            floors = run_worker("floors", threads, args.worker_timeout)
            record["floors"].append(dict(floors, threads=threads, round=round_index))
            if "bandwidth" in floors:
                print(f"  {threads} thread(s): read bandwidth {floors['bandwidth'] / 1e9:.1f} GB/s, GEMM "
                      + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in floors["gemm"].items()) + " GFLOP/s")
            for name in args.models:
                prep = record["prepared"][name]
                for precision in args.precisions:
                    workloads = [w for w in model_workloads if w != "batch" or precision in args.batch_precisions]
                    if not workloads:
                        continue
                    for engine in engines_for(precision, have_llama, have_hf):
                        run_one(record, args, spec, round_index, threads, name, prep, precision, engine, workloads)
            if "mtp" in args.workloads:
                run_mtp(record, args, spec, round_index, threads)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(record, indent=1))
    record["seconds"] = time.time() - started
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(record, indent=1))
    print_report(record, args)


def run_one(record, args, spec, round_index, threads, name, prep, precision, engine, workloads) -> None:
    options = dict(model_dir=prep["model_dir"], spec=dict(spec, workloads=workloads))
    if engine == "glm45":
        kind, options["precision"] = "glm45", precision
    elif engine.startswith("llama.cpp"):
        kind, options["gguf"] = "llama.cpp", prep["gguf"][GGUF_OF[precision]]
    else:
        kind = "transformers"
    busy = wait_for_quiet()
    start = time.perf_counter()
    result = run_worker(kind, threads, args.worker_timeout, **options)
    seconds = time.perf_counter() - start
    entry = dict(round=round_index, threads=threads, model=name, precision=precision, engine=engine,
                 seconds=seconds, busy_before=busy, **result)
    record["results"].append(entry)
    figures = ", ".join(f"{w} {result[w]:.1f}" for w in workloads if w in result)
    problem = shorten(result.get("unavailable") or result.get("error"))
    print(f"  {name:<6} {precision:<5} {engine:<18} {figures or ''}{' n/a: ' + problem if problem else ''}"
          f" ({seconds:.0f} s{busy_note(busy)})", flush=True)


def shorten(text: str | None, width: int = 110) -> str | None:
    return text if text is None or len(text) <= width else text[:width - 1] + "…"


def busy_note(busy: float) -> str:
    return f"; CPUs {busy:.0%} busy with other work at the start" if busy > QUIET["threshold"] else ""


def run_mtp(record, args, spec, round_index, threads) -> None:
    from glm45.config import bundled_model_path

    try:
        folder = str(bundled_model_path())
    except FileNotFoundError:
        if round_index == 0:
            print("  MTP rows skipped: no bundled model")
        return
    if args.mtp_paired:
        busy = wait_for_quiet()
        start = time.perf_counter()
        paired = run_worker("glm45-mtp-paired", threads, args.worker_timeout, model_dir=folder, spec=spec)
        seconds = time.perf_counter() - start
    for k in (0, 1):
        if args.mtp_paired:
            result = paired.get(f"k{k}", paired)
            if k == 1 and "mtp_pair_ratios" in paired:
                result = dict(result, mtp_pair_ratios=paired["mtp_pair_ratios"])
        else:
            busy = wait_for_quiet()
            start = time.perf_counter()
            result = run_worker("glm45-mtp", threads, args.worker_timeout, model_dir=folder,
                                spec=dict(spec, num_speculative_tokens=k))
            seconds = time.perf_counter() - start
        record["results"].append(dict(round=round_index, threads=threads, model="bundled", precision="bf16",
                                      engine=f"glm45 k={k}", seconds=seconds, busy_before=busy, **result))
        figure = f"mtp {result['mtp']:.1f}" if "mtp" in result else f"n/a: {result.get('error')}"
        if "mtp_pair_ratios" in result:
            median, low, high = median_range(result["mtp_pair_ratios"])
            figure += f"; paired k=1 ÷ k=0 median {median:.2f} ({low:.2f}–{high:.2f})"
        print(f"  bundled bf16  glm45 k={k:<12} {figure} ({seconds:.0f} s{busy_note(busy)})", flush=True)


def machine_info() -> dict:
    info = {"cpus": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags"))
        info["simd"] = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile")
                        if f in flags]
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)
    except (OSError, StopIteration, ValueError):
        pass
    return info


if __name__ == "__main__":
    main()
