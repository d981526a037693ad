"""The printed report of `bench_peers.py`: one Markdown table of every figure (median and range over rounds,
glm45's ratio to each peer, the fraction of the floor), thread scaling when more than one thread count ran,
and the issue's targets read off the table."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from benchmarks.models import BYTES_PER_WEIGHT, decode_bytes_per_token, split_precision
from benchmarks.peer_workers import batch_lengths
from glm45.config import ModelConfig

ORDER = ("decode", "batch", "prefill", "mtp")
PRECISION_ORDER = ("bf16", "int8", "int4", "fp8", "int4:int8")  # as bench_peers.PRECISIONS
BUSY_THRESHOLD = 0.15  # as peer_workers.QUIET["threshold"]


# ---------------------------------------------------------------------- pure helpers (unit-tested)
def median_range(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of the finite values; NaNs for none."""
    finite = [v for v in values if v == v]
    if not finite:
        return float("nan"), float("nan"), float("nan")
    return statistics.median(finite), min(finite), max(finite)


def format_figure(value: float) -> str:
    """Three significant figures at most, no exponent: 1234 → '1234', 56.78 → '56.8', 0.1234 → '0.123'."""
    if value != value:
        return "n/a"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def format_median_range(values: list[float]) -> tuple[str, str]:
    """('median', 'min–max') as printed in the table."""
    median, low, high = median_range(values)
    if median != median:
        return "n/a", ""
    return format_figure(median), f"{format_figure(low)}–{format_figure(high)}"


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def flops_per_request(config: dict, prompt_len: int, output_len: int) -> float:
    """Matmul + attention FLOPs (2 per multiply-add) of one request: its prompt and output tokens through the
    active weights (head only where logits are needed), attention over the growing context."""
    c = ModelConfig.from_dict(config)
    head = c.vocab_size * c.hidden_size
    active = decode_bytes_per_token(c, 1.0) - head  # ≈ parameters per token, the head aside
    tokens = prompt_len + output_len
    attention_per_position = 4 * c.num_hidden_layers * c.num_attention_heads * c.head_dim
    attention = attention_per_position * tokens * tokens / 2
    return 2 * active * tokens + 2 * head * output_len + attention


# ---------------------------------------------------------------------- the report


def collect(record: dict) -> dict:
    """{(threads, model, precision, workload, engine): [value per round]} (NaN where a round failed), and
    per key the reason when no round produced a figure."""
    figures: dict = defaultdict(lambda: [float("nan")] * record["args"]["rounds"])
    reasons: dict = {}
    for entry in record["results"]:
        for workload in ORDER:
            key = (entry["threads"], entry["model"], entry["precision"], workload, entry["engine"])
            if workload in entry:
                figures[key][entry["round"]] = entry[workload]
                if entry.get("busy_max", 0.0) > BUSY_THRESHOLD:
                    reasons[key] = "busy"
            elif "unavailable" in entry or "error" in entry:
                requested = entry["model"] == "bundled" if workload == "mtp" else workload in _workloads(record, entry)
                if requested:
                    figures[key]
                    reasons[key] = "not available" if "unavailable" in entry else "failed"
    return figures, reasons


def _workloads(record: dict, entry: dict) -> list[str]:
    args = record["args"]
    return [w for w in args["workloads"]
            if w != "mtp" and (w != "batch" or entry["precision"] in args["batch_precisions"])]


def floors(record: dict) -> tuple[dict, dict]:
    """Best read bandwidth and best GEMM rate per thread count, over rounds."""
    bandwidth, gemm = defaultdict(float), defaultdict(float)
    for f in record["floors"]:
        if "bandwidth" in f:
            bandwidth[f["threads"]] = max(bandwidth[f["threads"]], f["bandwidth"])
            gemm[f["threads"]] = max(gemm[f["threads"]], *f["gemm"].values())
    return bandwidth, gemm


def gguf_decode_bytes(tensors: dict, config: ModelConfig, context: int = 0) -> float:
    """Bytes one batch-1 decode step reads from a GGUF file, by its own tensor types: every tensor of the
    main layers, k of E of each routed-expert tensor, one embedding row; the MTP (NextN) layers excluded."""
    total = 0.0
    for name, (_, _, nbytes) in tensors.items():
        parts = name.split(".")
        if parts[0] == "blk" and int(parts[1]) >= config.num_hidden_layers:
            continue
        if name == "token_embd.weight":
            total += nbytes / config.vocab_size
        elif "_exps" in name:
            total += nbytes * config.num_experts_per_tok / config.n_routed_experts
        else:
            total += nbytes
    kv = config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * 2 * context
    return total + kv


def decode_bytes(record: dict, model: str, precision: str, engine: str) -> float | None:
    """Bytes a decode step of this row reads: the GGUF's own for llama.cpp, the precision's nominal size else."""
    prepared = record["prepared"].get(model)
    if prepared is None:
        return None
    args = record["args"]
    config = ModelConfig.from_pretrained(prepared["model_dir"])
    context = args["decode_prompt"] + args["decode_len"] // 2
    if engine.startswith("llama.cpp"):
        tensors = prepared["gguf_tensors"].get(engine.split()[-1])
        return None if tensors is None else gguf_decode_bytes(tensors, config, context)
    weights, head = split_precision(precision)
    return decode_bytes_per_token(config, BYTES_PER_WEIGHT[weights], context, BYTES_PER_WEIGHT.get(head))


def floor_tok_s(record: dict, key: tuple, bandwidth: dict, gemm: dict) -> tuple[float, str] | None:
    threads, model, precision, workload, engine = key
    args = record["args"]
    if model not in record["prepared"]:
        return None
    raw = json.loads((Path(record["prepared"][model]["model_dir"]) / "config.json").read_text())
    if workload == "decode" and bandwidth.get(threads):
        nbytes = decode_bytes(record, model, precision, engine)
        return None if nbytes is None else (bandwidth[threads] / nbytes, "BW")
    if precision != "bf16" or not gemm.get(threads):
        return None
    if workload == "batch":
        lengths = batch_lengths(args["num_requests"], args["batch_min_prompt"], args["batch_max_prompt"])
        flops = sum(flops_per_request(raw, n, args["output_len"]) for n in lengths)
        return gemm[threads] * len(lengths) * args["output_len"] / flops, "GEMM"
    if workload == "prefill":
        flops = flops_per_request(raw, args["prefill_len"], 1)
        return gemm[threads] * args["prefill_len"] / flops, "GEMM"
    return None


def print_report(record: dict, args) -> None:
    figures, reasons = collect(record)
    bandwidth, gemm = floors(record)
    multi_threads = len(args.threads) > 1
    label = {"decode": "decode bs=1", "batch": f"{args.num_requests} req × {args.output_len}",
             "prefill": f"prefill {args.prefill_len}", "mtp": "MTP chat bs=1"}
    medians = {key: median_range(values)[0] for key, values in figures.items()}

    def sort_key(key):
        threads, model, precision, workload, engine = key
        models = args.models + ["bundled"]
        return (threads, models.index(model), PRECISION_ORDER.index(precision),
                ORDER.index(workload), 0 if engine.startswith("glm45") else 1 if engine.startswith("llama") else 2,
                engine)

    print()
    when = record["started"]
    machine = record["machine"]
    print(f"glm45 peer benchmark, {when}: {machine.get('cpu', '?')}, {machine.get('cpus')} cores "
          f"({', '.join(machine.get('simd', []))}), {machine.get('memory_gib', '?')} GiB; "
          f"{args.rounds} round(s), threads {','.join(map(str, args.threads))}")
    for threads in args.threads:
        if bandwidth.get(threads):
            print(f"floors, {threads} thread(s): read bandwidth {bandwidth[threads] / 1e9:.1f} GB/s, "
                  f"best GEMM {gemm[threads] / 1e9:.0f} GFLOP/s")
    print("figures: tokens per second (decode: generated after the first; batch: generated, prefill included; "
          "prefill: prompt tokens; MTP: generated, per chat)")
    print("ratio: for peers, glm45's median ÷ theirs (≥ 1 means glm45 is faster); for glm45 int8/int4/fp8, "
          "÷ glm45 bf16; for MTP k=1, ÷ k=0")
    print("floor: decode vs read bandwidth / weight bytes touched per token (BW); bf16 batch and prefill vs the "
          "workload's FLOPs at the best GEMM rate (GEMM)\n")
    header = (["threads"] if multi_threads else []) + [
        "model", "precision", "workload", "engine", "median tok/s", "range", "ratio", "% of floor"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if h in ("model", "precision", "workload", "engine", "threads") else "---:"
                         for h in header) + "|")
    busy_rows = 0
    for key in sorted(figures, key=sort_key):
        threads, model, precision, workload, engine = key
        median, spread = format_median_range(figures[key])
        if key in reasons and median == "n/a":
            median, spread = f"n/a ({reasons[key]})", ""
        elif reasons.get(key) == "busy":
            median += "*"
            busy_rows += 1
        ratio = ratio_text(key, medians)
        floor = floor_tok_s(record, key, bandwidth, gemm) if median[0].isdigit() else None
        floor_text = f"{medians[key] / floor[0]:.0%} {floor[1]}" if floor else ""
        cells = ([str(threads)] if multi_threads else []) + [
            model, precision, label[workload], engine, median, spread, ratio, floor_text]
        print("| " + " | ".join(cells) + " |")
    if busy_rows:
        print(f"\n* at least one run of this figure started while other work kept the CPUs over "
              f"{BUSY_THRESHOLD:.0%} busy after waiting {args.quiet_wait:.0f} s: treat it with care")
    print_decode_bytes(record, figures, args)
    if "mtp" in args.workloads:
        print_mtp_identity(record)
    if multi_threads:
        print_scaling(figures, args, label)
    print_targets(medians, args, pair_ratios(record))


def ratio_text(key: tuple, medians: dict) -> str:
    threads, model, precision, workload, engine = key
    this = medians.get(key, float("nan"))
    if engine == "glm45" and precision == "bf16":
        return "—"
    if engine == "glm45":
        base, suffix = medians.get((threads, model, "bf16", workload, "glm45"), float("nan")), "× bf16"
        value = this / base
    elif engine == "glm45 k=1":
        value, suffix = this / medians.get((threads, model, precision, workload, "glm45 k=0"), float("nan")), "× k=0"
    elif engine == "glm45 k=0":
        return "—"
    else:
        value, suffix = medians.get((threads, model, precision, workload, "glm45"), float("nan")) / this, "×"
    return "" if value != value else f"{value:.2f}{suffix}"


def print_decode_bytes(record: dict, figures: dict, args) -> None:
    """The bytes behind each decode floor, and how llama.cpp's quantized files mix tensor types."""
    seen = sorted({(k[1], k[2], k[4]) for k in figures if k[3] == "decode"},
                  key=lambda m: (args.models.index(m[0]), PRECISION_ORDER.index(m[1]), m[2]))
    lines = []
    for model, precision, engine in seen:
        nbytes = decode_bytes(record, model, precision, engine)
        if nbytes is None:
            continue
        mix = ""
        if engine.startswith("llama.cpp"):
            counts: dict = defaultdict(int)
            for kind, _, size in record["prepared"][model]["gguf_tensors"][engine.split()[-1]].values():
                counts[kind] += size
            mix = " (file: " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in
                                          sorted(counts.items(), key=lambda kv: -kv[1]) if v >= 2**20) + ")"
        lines.append(f"  {model:<6} {precision:<5} {engine:<18} {nbytes / 1e6:7.1f} MB{mix}")
    if lines:
        print("\nbytes read per decoded token (the decode floor's denominator; llama.cpp from its GGUF's tensor "
              "types, glm45 and transformers at the precision's nominal size):")
        print("\n".join(dict.fromkeys(lines)))


def print_mtp_identity(record: dict) -> None:
    """Whether MTP k=1 produced exactly k=0's tokens, round by round."""
    outputs = defaultdict(dict)
    for entry in record["results"]:
        if entry["model"] == "bundled" and "mtp_tokens" in entry:
            outputs[(entry["threads"], entry["round"])][entry["engine"]] = entry["mtp_tokens"]
    verdicts = [o["glm45 k=0"] == o["glm45 k=1"] for o in outputs.values() if len(o) == 2]
    ratios = pair_ratios(record)
    if ratios:
        median, low, high = median_range(ratios)
        first, _, third = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (median,) * 3
        print(f"\nMTP, passes paired in one process: k=1 ÷ k=0 median {median:.2f} (quartiles {first:.2f}–{third:.2f}, "
              f"range {low:.2f}–{high:.2f}) over {len(ratios)} pairs")
    if verdicts and record.get("args", {}).get("mtp_temperature", 0.0) > 0:
        print("\nMTP: sampled chats (k=1 draws from the same distributions as k=0, not the same tokens)")
    elif verdicts:
        print(f"\nMTP: greedy outputs with k=1 identical to k=0 in {sum(verdicts)}/{len(verdicts)} run(s)")


def print_scaling(figures: dict, args, label: dict) -> None:
    low, high = args.threads[0], args.threads[-1]
    print(f"\nthread scaling: median at {high} threads ÷ median at {low}")
    for key in sorted(figures):
        if key[0] != high:
            continue
        base = (low,) + key[1:]
        if base in figures:
            a, b = median_range(figures[base])[0], median_range(figures[key])[0]
            if a == a and b == b:
                print(f"  {key[1]:<7} {key[2]:<5} {label[key[3]]:<16} {key[4]:<18} {format_figure(a):>7} → "
                      f"{format_figure(b):>7}  {b / a:.2f}×")


def pair_ratios(record: dict) -> list[float]:
    """Every k=1 ÷ k=0 ratio of neighbouring passes of a `--mtp-paired` run, sorted (none otherwise)."""
    return sorted(r for entry in record["results"] for r in entry.get("mtp_pair_ratios", []))


def print_targets(medians: dict, args, paired: list[float] | None = None) -> None:
    """Issue 15's and 16's targets, each read off the medians (at the highest thread count); with `--mtp-paired`,
    MTP's also off the median of the paired passes' ratios (`paired`), the steadier estimate here."""
    t = args.threads[-1]
    rows = []

    def ratio(a, b):
        return medians.get(a, float("nan")) / medians.get(b, float("nan"))

    for model in args.models:
        rows.append((f"{model} bf16 decode: glm45 ≥ llama.cpp BF16", ratio(
            (t, model, "bf16", "decode", "glm45"), (t, model, "bf16", "decode", "llama.cpp BF16")), 1.0))
        rows.append((f"{model} batch: glm45 ≥ 3× transformers", ratio(
            (t, model, "bf16", "batch", "glm45"), (t, model, "bf16", "batch", "transformers")), 3.0))
        rows.append((f"{model} batch: glm45 ≥ llama.cpp BF16 (16 seqs)", ratio(
            (t, model, "bf16", "batch", "glm45"), (t, model, "bf16", "batch", "llama.cpp BF16")), 1.0))
        for precision, gguf in (("int8", "Q8_0"), ("int4", "Q4_K_M")):
            rows.append((f"{model} decode: glm45 {precision} ≥ llama.cpp {gguf}", ratio(
                (t, model, precision, "decode", "glm45"), (t, model, precision, "decode", f"llama.cpp {gguf}")), 1.0))
        rows.append((f"{model} decode: glm45 fp8 ≥ 1.6× glm45 bf16", ratio(
            (t, model, "fp8", "decode", "glm45"), (t, model, "bf16", "decode", "glm45")), 1.6))
    if not getattr(args, "mtp_temperature", 0.0) and getattr(args, "mtp_tool_constraint", "off") == "off":
        # the target is for plain greedy chats
        rows.append(("MTP k=1 ≥ 1.4× k=0 (bundled, bs=1)", ratio(
            (t, "bundled", "bf16", "mtp", "glm45 k=1"), (t, "bundled", "bf16", "mtp", "glm45 k=0")), 1.4))
        if paired:
            rows.append(("MTP k=1 ≥ 1.4× k=0, paired passes' median", median_range(paired)[0], 1.4))
    rows = [r for r in rows if r[1] == r[1]]
    if rows:
        print("\ntargets (issues 15 and 16), from the medians:")
        for text, value, goal in rows:
            print(f"  {text:<50} {value:5.2f}  {'met' if value >= goal else 'not met'}")
