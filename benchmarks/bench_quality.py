"""What quantizing costs in quality, measured token by token against the float32 model on the same text: glm45's
int8 / int4 / fp8 and llama.cpp's Q8_0 / Q4_K_M, each against its own engine's float32.

    python benchmarks/bench_quality.py MODEL --data held_out.jsonl
    python benchmarks/bench_quality.py MODEL --data held_out.jsonl --no-llama-cpp --formats int4,int4:int8
    python benchmarks/bench_quality.py MODEL --data held_out.jsonl --checkpoints "int4 gptq=DIR"  # glm45 quantize

A format `W:H` is weights in W with the LM heads in H (`--lm-head-quantization H`; `int4:int8` is the mix
closest to Q4_K_M, which keeps its output matrix in Q6_K).

The records are `glm45 eval`'s (texts, or conversations whose assistant spans are scored). At every scored position
each model's full next-token distribution is compared with its reference's (glm45: the model loaded in float32;
llama.cpp: an F32 GGUF of the same weights, written by `glm45 export`, then quantized by llama.cpp's own quantizer):

- perplexity, and the change in mean log-likelihood against the reference with its standard error over tokens
  (paired: the same tokens, so text difficulty cancels and what is left is the quantization's effect);
- the mean KL divergence KL(reference ‖ quantized) and its 99th percentile, and how often the most likely token is
  the same: the figures llama.cpp's `llama-perplexity --kl-divergence` reports. They use every probability, not
  only the scored token's, so they still resolve differences on a model so sure of its text (perplexity ≈ 1.03) that
  its perplexity moves by a few parts in 100,000 either way;
- glm45 float32 against llama.cpp F32 checks that both engines see the same model and text (it should be ≈ 0).

Every model stays loaded and the records go through them in turn (a small model: this holds one record's
distributions per model, the vocabulary × the record's scored tokens).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GLM45_FORMATS = ("int8", "int4", "fp8")
LLAMA_TYPES = ("Q8_0", "Q4_K_M")
_LLAMA_LOG = None


def glm45_rows(model, record) -> np.ndarray:
    """log-softmax rows (float64) at the positions that predict the scored tokens of `record`."""
    ids = torch.tensor([record.input_ids])
    with torch.no_grad():
        logits = model(ids)[0].float()
    rows = torch.log_softmax(logits.double(), dim=-1).numpy()
    return rows[predicting(record)]


def predicting(record) -> np.ndarray:
    """Positions t - 1 whose next-token distribution scores token t."""
    return np.array([t - 1 for t in range(1, len(record.input_ids)) if record.scored[t]], dtype=np.int64)


def scored_ids(record) -> np.ndarray:
    return np.array([record.input_ids[t] for t in range(1, len(record.input_ids)) if record.scored[t]])


class Tally:
    """Per-token figures of one model against its reference, gathered over records."""

    def __init__(self):
        self.logprob, self.delta, self.kl, self.same_top = [], [], [], []

    def add(self, rows: np.ndarray, reference: np.ndarray, ids: np.ndarray) -> None:
        picked = rows[np.arange(len(ids)), ids]
        self.logprob.append(picked)
        self.delta.append(picked - reference[np.arange(len(ids)), ids])
        self.kl.append((np.exp(reference) * (reference - rows)).sum(-1))
        self.same_top.append(rows.argmax(-1) == reference.argmax(-1))

    def summary(self) -> dict:
        logprob, delta, kl = (np.concatenate(v) for v in (self.logprob, self.delta, self.kl))
        n = len(logprob)
        return {"tokens": n, "perplexity": math.exp(-logprob.mean()),
                "mean_logprob_change": delta.mean(), "change_stderr": delta.std(ddof=1) / math.sqrt(n),
                "mean_kl": kl.mean(), "kl_p99": float(np.quantile(kl, 0.99)),
                "same_top": float(np.concatenate(self.same_top).mean())}


def llama_cpp_models(model_dir: Path, workdir: Path, threads: int, context: int):
    """LlamaCpp instances of an F32 GGUF of `model_dir` (glm45 export) and its Q8_0 / Q4_K_M quantizations."""
    import ctypes

    import llama_cpp

    from benchmarks.gguf_export import quantize_gguf
    from benchmarks.peer_workers import LlamaCpp
    from glm45.export.gguf import export_gguf

    global _LLAMA_LOG  # the callback must outlive every call llama.cpp makes to it
    _LLAMA_LOG = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
    llama_cpp.llama_log_set(_LLAMA_LOG, ctypes.c_void_p(0))  # its loader prints every tensor and token type

    f32 = workdir / "model-F32.gguf"
    if not f32.is_file():
        export_gguf(model_dir, f32, "f32")
    files = {"F32": f32}
    for quant in LLAMA_TYPES:
        files[quant] = quantize_gguf(f32, workdir / f"model-{quant}.gguf", quant, threads)
    return {name: LlamaCpp(str(path), threads, n_ctx=context) for name, path in files.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="an HF-layout folder with its tokenizer (bf16 or float32 weights)")
    parser.add_argument("--data", required=True, help="JSONL records, as glm45 eval reads them")
    parser.add_argument("--formats", default=",".join(GLM45_FORMATS),
                        help="glm45 formats to measure; W:H for weights in W with the LM heads in H")
    parser.add_argument("--checkpoints", default="",
                        help="also measure saved checkpoints of the same model (glm45 quantize), as NAME=PATH,...")
    parser.add_argument("--no-llama-cpp", action="store_true", help="leave llama.cpp out")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="where the GGUFs are written (default: a temporary folder)")
    parser.add_argument("--output", default=None, help="also write the report here (JSON)")
    args = parser.parse_args()

    from benchmarks.models import split_precision
    from glm45.evaluation import read_records
    from glm45.model import Glm4MoeForCausalLM
    from glm45.tokenizer import Tokenizer

    torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    records = read_records(args.data, Tokenizer.from_pretrained(model_dir), max_len=args.max_model_len)
    formats = [f for f in args.formats.split(",") if f]
    load = dict(dtype="float32", progress=False, load_mtp=False)
    reference = Glm4MoeForCausalLM.from_pretrained(model_dir, **load)
    glm45 = {}
    for spec in formats:
        fmt, head = split_precision(spec)
        name = f"glm45 {fmt}" + (f", LM head {head}" if head else "")
        glm45[name] = Glm4MoeForCausalLM.from_pretrained(model_dir, quantization=fmt, lm_head_quantization=head,
                                                         **load)
    for entry in filter(None, args.checkpoints.split(",")):
        name, sep, path = entry.partition("=")
        if not sep or not Path(path).is_dir():
            sys.exit(f"--checkpoints takes NAME=PATH with PATH a checkpoint folder, got {entry!r}")
        glm45[f"glm45 {name}"] = Glm4MoeForCausalLM.from_pretrained(path, **load)
    llama = {}
    if not args.no_llama_cpp:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            sys.exit("llama-cpp-python is not installed: give --no-llama-cpp, or install it (see the README)")
        workdir = Path(args.workdir or tempfile.mkdtemp(prefix="glm45-quality-"))
        workdir.mkdir(parents=True, exist_ok=True)
        llama = llama_cpp_models(model_dir, workdir, args.threads, args.max_model_len + 8)
    tallies = {name: Tally() for name in ["glm45 float32", *glm45, *(f"llama.cpp {n}" for n in llama)]}
    start = time.perf_counter()
    for record in records:
        ids = scored_ids(record)
        if not len(ids):
            continue
        ref = glm45_rows(reference, record)
        tallies["glm45 float32"].add(ref, ref, ids)
        for name, model in glm45.items():
            tallies[name].add(glm45_rows(model, record), ref, ids)
        if llama:
            rows = {n: np.stack(m.logprobs(record.input_ids[:-1]))[predicting(record)] for n, m in llama.items()}
            for name, r in rows.items():
                tallies[f"llama.cpp {name}"].add(r, rows["F32"], ids)
            tallies.setdefault("llama.cpp F32 vs glm45 float32", Tally()).add(rows["F32"], ref, ids)
    report = {"model": str(model_dir), "data": args.data, "records": len(records),
              "seconds": round(time.perf_counter() - start, 1),
              "results": {name: tally.summary() for name, tally in tallies.items()}}
    print(f"{report['results']['glm45 float32']['tokens']} scored tokens of {len(records)} records of {args.data}; "
          "each quantized model against its engine's float32\n")
    print("| model | perplexity | log-likelihood change ± s.e. (nats/token) | mean KL | KL p99 | same top token |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in report["results"].items():
        print(f"| {name} | {r['perplexity']:.6f} | {r['mean_logprob_change']:+.2e} ± {r['change_stderr']:.1e} | "
              f"{r['mean_kl']:.2e} | {r['kl_p99']:.2e} | {100 * r['same_top']:.2f}% |")
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
