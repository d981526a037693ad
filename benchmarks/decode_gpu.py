"""Decode and long-prompt prefill of a random-weight GLM-4.5-Air-shaped model on one CUDA GPU (TP=1), bf16 and
FP8 weights, eager and with the CUDA-graph-captured step, against the HBM bandwidth floor.

    python benchmarks/decode_gpu.py                   # 8 Air layers; bs 1, 8, 32; bf16 and fp8; eager and graph
    python benchmarks/decode_gpu.py --layers 46 --weights fp8 --modes graph   # Air's whole depth in FP8

The model has GLM-4.5-Air's real widths (hidden 4096, 96/8 heads × 128, 128 experts top-8 of width 1408 plus
a shared one, vocabulary 151,552) and `--layers` of its depth (Air's 46 layers in bf16 are 212 GB, more than
one GPU; decode time per layer is what the floor is about). Weights are random (std 0.02), built on the GPU.
FP8 packs every linear weight, the embedding and the head in e4m3 with a scale per output row (glm45's
`--quantization fp8`), multiplied with torch's scaled matmuls on dynamically quantized activations.

Floor of one decode step = (weight bytes the step reads + KV bytes it reads) / measured copy bandwidth; the
weight bytes count the experts a batch of B tokens touches on average (E·(1-(1-k/E)^B) per MoE layer), at the
bytes per weight of the format. Timed: engine steps once every sequence decodes, after warm-up. Also: how
close the graph's logits are to the eager ones, a 32k-token prompt through chunked prefill (peak memory), and
the attention kernels each shape ran. Without CUDA the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glm45 import SamplingParams  # noqa: E402
from glm45.config import EngineConfig, ModelConfig  # noqa: E402
from glm45.engine import LLMEngine  # noqa: E402
from glm45.model import Glm4MoeForCausalLM  # noqa: E402
from glm45.quant.loading import quantize_model  # noqa: E402

AIR = dict(vocab_size=151552, hidden_size=4096, intermediate_size=10944, moe_intermediate_size=1408,
           num_attention_heads=96, num_key_value_heads=8, head_dim=128, first_k_dense_replace=1,
           n_routed_experts=128, num_experts_per_tok=8, n_shared_experts=1, use_qk_norm=False,
           routed_scaling_factor=1.0, num_nextn_predict_layers=0, eos_token_id=[151329, 151336, 151338])


def measure_bandwidth(device: torch.device, size_bytes: int = 4 << 30) -> float:
    """Bytes/s moved by a device-to-device copy (read + write), best of several."""
    src = torch.empty(size_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    best = 0.0
    for _ in range(10):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize(device)
        best = max(best, 2 * size_bytes / (time.perf_counter() - start))
    del src, dst
    torch.cuda.empty_cache()
    return best


@torch.no_grad()
def build_model(config: ModelConfig, weights: str, device: torch.device) -> Glm4MoeForCausalLM:
    with torch.device(device):
        model = Glm4MoeForCausalLM(config)
    model.init_weights(std=0.02, generator=torch.Generator(device).manual_seed(0))
    model.to(torch.bfloat16)
    for module in model.modules():
        if type(module).__name__ == "Router":
            module.float()
    if weights == "fp8":
        quantize_model(model, "fp8")
    return model.eval()


def step_bytes(config: ModelConfig, batch: int, context: int, bytes_per_weight: float) -> float:
    """Weight + KV bytes one decode step of `batch` sequences with `context` tokens each reads."""
    h = config.hidden_size
    attention = h * config.head_dim * 2 * (config.num_attention_heads + config.num_key_value_heads)
    expert = 3 * h * config.moe_intermediate_size
    touched = config.n_routed_experts * (1 - (1 - config.num_experts_per_tok / config.n_routed_experts) ** batch)
    moe = expert * (touched + config.n_shared_experts)
    weights = (config.num_hidden_layers * attention + config.first_k_dense_replace * 3 * h * config.intermediate_size
               + config.num_moe_layers * moe + config.vocab_size * h) * bytes_per_weight
    weights += config.num_moe_layers * config.n_routed_experts * h * 4  # fp32 routers
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2 * context * batch
    return weights + kv


def run_requests(engine: LLMEngine, batch: int, prompt_len: int, decode_tokens: int, tag: str) -> list[float]:
    """Seconds of each step where every sequence decodes."""
    params = SamplingParams(temperature=0, max_tokens=decode_tokens, ignore_eos=True)
    generator = torch.Generator().manual_seed(batch)
    vocab = engine.model_config.vocab_size
    for i in range(batch):
        engine.add_request(f"{tag}-{i}", torch.randint(0, vocab, (prompt_len,), generator=generator).tolist(), params)
    durations = []
    while engine.has_unfinished_requests():
        decoding = all(not seq.in_prefill for seq in engine.scheduler.running) and not engine.scheduler.waiting
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        if decoding:
            durations.append(time.perf_counter() - start)
    return durations[len(durations) // 4:]  # drop the first steps (allocator, lazy init)


def guarded(label: str, extra: dict, fn, *args, **kwargs):
    """fn(*args, **kwargs) for one part of the benchmark; a failure is reported and the rest still runs."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 — a benchmark reports what broke and goes on
        extra[f"{label}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        print(f"  {label}: FAILED — {extra[label + '_error']}")
        return None


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def attention_kernels(engine: LLMEngine, prompt_len: int, tag: str) -> list[str]:
    """Names of the attention kernels one request's steps launch (profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run_requests(engine, 1, prompt_len, 4, tag)
    names = {e.key for e in prof.key_averages() if any(w in e.key.lower() for w in ("attention", "fmha", "flash",
                                                                                     "softmax", "sdpa"))}
    return sorted(names)[:6]


def engine_for(folder: str, model, max_len: int, batches: list[int], eager: bool) -> LLMEngine:
    return LLMEngine(EngineConfig(model=folder, device="cuda", dtype="bfloat16", max_model_len=max_len,
                                  num_gpu_blocks_override=max(batches) * (max_len // 16 + 2), enforce_eager=eager,
                                  cuda_graph_sizes=[b for b in (1, 2, 4, 8, 16, 32, 64) if b <= max(batches)]),
                     model=model)


def graph_agreement(folder: str, model, max_len: int) -> float:
    """Largest |logit difference| / largest |logit| between the eager and the captured step, same inputs."""
    from glm45.engine.attention import SeqSlice
    from glm45.engine.model_runner import StepInputs

    engines = [engine_for(folder, model, max_len, [4], eager) for eager in (True, False)]
    logits = []
    for engine in engines:
        runner = engine.runner
        prompt = list(range(1000, 1040))
        table = list(range(4))
        runner.forward(StepInputs(prompt, list(range(40)), list(range(40)), [SeqSlice(0, 40, 40, table)]), [])
        inputs = StepInputs([7], [40], [40], [SeqSlice(0, 1, 41, table)])
        logits.append(runner.forward(inputs, [0]).float().cpu())
    return float((logits[0] - logits[1]).abs().max() / logits[0].abs().max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of Air's 46 (1 dense, the rest MoE)")
    parser.add_argument("--weights", default="bf16,fp8", help="comma-separated: bf16, fp8")
    parser.add_argument("--modes", default="eager,graph", help="comma-separated: eager, graph")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=48)
    parser.add_argument("--long-prompt", type=int, default=32768, help="prefill test length (0: skip)")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("decode_gpu: skipped — this benchmark needs a CUDA GPU and none is visible here "
              "(torch.cuda.is_available() is False).")
        return 0
    device = torch.device("cuda")
    config = ModelConfig(**AIR, num_hidden_layers=args.layers, torch_dtype="bfloat16")
    bandwidth = measure_bandwidth(device)
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}: copy bandwidth {bandwidth / 1e12:.2f} "
          f"TB/s; Air-shaped, {args.layers} layers, TP=1, prompt {args.prompt_len}, {args.decode_tokens} tokens")
    print(f"{'weights':8} {'mode':6} {'batch':>5} {'ms/step':>8} {'tok/s':>8} {'floor ms':>9} {'of floor':>8}")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    rows, extra = [], {}
    max_len = args.prompt_len + args.decode_tokens + 16
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(config.to_hf_dict()))
        for weights in args.weights.split(","):
            model = build_model(config, weights, device)
            if "graph" in args.modes:
                diff = guarded(f"{weights}_graph_vs_eager", extra, graph_agreement, folder, model, max_len)
                if diff is not None:
                    extra[f"{weights}_graph_vs_eager_max_logit_diff"] = diff
                    print(f"  {weights}: graph vs eager logits, one decode step: max |diff| / max |logit| = {diff:.2e}")
            for mode in args.modes.split(","):
                start = time.perf_counter()
                engine = guarded(f"{weights}_{mode}_engine", extra, engine_for, folder, model, max_len, batches,
                                 eager=mode == "eager")
                if engine is None:
                    continue
                setup = time.perf_counter() - start
                run_requests(engine, 1, 16, 8, f"warm-{weights}-{mode}")
                for batch in batches:
                    durations = guarded(f"{weights}_{mode}_{batch}", extra, run_requests, engine, batch,
                                        args.prompt_len, args.decode_tokens, f"{weights}-{mode}-{batch}")
                    if not durations:
                        continue
                    seconds = median(durations)
                    context = args.prompt_len + args.decode_tokens // 2
                    floor = step_bytes(config, batch, context, 1 if weights == "fp8" else 2) / bandwidth
                    rows.append(dict(weights=weights, mode=mode, batch=batch, ms=seconds * 1e3, tok_s=batch / seconds,
                                     floor_ms=floor * 1e3, of_floor=floor / seconds, setup_s=setup))
                    print(f"{weights:8} {mode:6} {batch:>5} {seconds * 1e3:>8.2f} {batch / seconds:>8.1f} "
                          f"{floor * 1e3:>9.3f} {floor / seconds:>8.1%}   (engine ready in {setup:.1f} s)")
                if weights == "bf16" and mode == "graph":
                    extra["decode_attention_kernels"] = guarded("decode_kernels", extra, attention_kernels, engine, 64,
                                                                "kernels")
                del engine
                torch.cuda.empty_cache()
            if weights == "bf16" and args.long_prompt:
                extra.update(guarded("long_prefill", extra, long_prefill, folder, model, args.long_prompt) or {})
            del model
            torch.cuda.empty_cache()
    for key, value in extra.items():
        print(f"{key}: {value}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rows": rows, **extra}, indent=2))
    return 0


def long_prefill(folder: str, model, length: int) -> dict:
    """A `length`-token prompt in 2,048-token chunks: time, peak memory, and the attention kernels it ran."""
    torch.cuda.reset_peak_memory_stats()
    engine = LLMEngine(EngineConfig(model=folder, device="cuda", dtype="bfloat16", max_model_len=length + 32,
                                    num_gpu_blocks_override=(length + 32) // 16 + 2, max_num_batched_tokens=2048,
                                    enforce_eager=True), model=model)
    prompt = torch.randint(0, model.config.vocab_size, (length,), generator=torch.Generator().manual_seed(5)).tolist()
    engine.add_request("long", prompt, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    torch.cuda.synchronize()
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {"long_prefill_tokens": length, "long_prefill_s": round(seconds, 2),
              "long_prefill_tok_s": round(length / seconds), "long_prefill_peak_gib":
              round(torch.cuda.max_memory_allocated() / 2**30, 1)}
    result["prefill_attention_kernels"] = guarded("prefill_kernels", result, attention_kernels, engine, 4096,
                                                  "prefill-kernels")
    del engine
    return result


if __name__ == "__main__":
    sys.exit(main())
