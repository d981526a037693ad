"""Decode speed of a random-weight GLM-4.5-Air-shaped model on one CUDA GPU (TP=1), bf16 and FP8 weights,
beside the memory-bandwidth floor.

    python benchmarks/decode_gpu.py                       # 8 Air layers, batch 1 and 8, bf16 and fp8
    python benchmarks/decode_gpu.py --layers 46 --weights fp8   # the whole of Air's depth (FP8 checkpoint:
                                                          # 106 GB on disk, but see below for memory)

The model has GLM-4.5-Air's real widths (hidden 4096, 96/8 heads × 128, 128 experts top-8 of width 1408
plus a shared one, vocabulary 151,552) and `--layers` of its depth: Air's 46 layers do not fit one GPU in
bf16 (212 GB), and decode time per layer is what the floor is about. Weights are random (std 0.02; the
routers' outputs then spread over the experts like a trained model's, roughly), built on the GPU directly.

- bf16: the weights as a bf16 checkpoint loads them.
- fp8: every linear weight that an FP8 release quantises goes through e4m3 with a per-output-channel
  scale and back, which is exactly what loading an FP8 (compressed-tensors) checkpoint does today:
  glm45 dequantises FP8 to the compute dtype at load, so these weights are *resident in bf16* and a decode
  step reads bf16 bytes. Its row therefore shows two floors: for the bytes it reads now, and for FP8 bytes
  (what an FP8-matmul path — torch._scaled_mm — would read).

Floor of one decode step = (weight bytes the step reads + KV bytes it reads) / measured copy bandwidth;
the weight bytes count the experts a batch of B tokens touches on average (E·(1-(1-k/E)^B) per MoE layer).
Timed: engine steps once every sequence of the batch is decoding (prefill excluded), after warm-up.
Without CUDA the script says so and exits 0.
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

AIR = dict(vocab_size=151552, hidden_size=4096, intermediate_size=10944, moe_intermediate_size=1408,
           num_attention_heads=96, num_key_value_heads=8, head_dim=128, first_k_dense_replace=1,
           n_routed_experts=128, num_experts_per_tok=8, n_shared_experts=1, use_qk_norm=False,
           routed_scaling_factor=1.0, num_nextn_predict_layers=0, eos_token_id=[151329, 151336, 151338])
FP8_SKIP = ("embed_tokens", "lm_head", "norm", "mlp.gate.")


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
        fp8_max = torch.finfo(torch.float8_e4m3fn).max
        for name, param in model.named_parameters():
            if param.dim() < 2 or any(s in name for s in FP8_SKIP):
                continue
            w = param.float()
            scale = w.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / fp8_max
            param.copy_(((w / scale).to(torch.float8_e4m3fn).float() * scale).to(param.dtype))
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


def time_decode(engine: LLMEngine, batch: int, prompt_len: int, decode_tokens: int) -> float:
    """Seconds per decode step, averaged over the steps where every sequence decodes."""
    params = SamplingParams(temperature=0, max_tokens=decode_tokens, ignore_eos=True)
    generator = torch.Generator().manual_seed(batch)
    vocab = engine.model_config.vocab_size
    for i in range(batch):
        prompt = torch.randint(0, vocab, (prompt_len,), generator=generator).tolist()
        engine.add_request(f"b{batch}-{i}", prompt, params)
    durations = []
    while engine.has_unfinished_requests():
        decoding = all(not seq.in_prefill for seq in engine.scheduler.running) and not engine.scheduler.waiting
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        if decoding:
            durations.append(time.perf_counter() - start)
    steady = durations[len(durations) // 4:]  # drop the first steps (allocator, lazy init)
    return sum(steady) / len(steady)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of Air's 46 (1 dense, the rest MoE)")
    parser.add_argument("--weights", default="bf16,fp8", help="comma-separated: bf16, fp8")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("decode_gpu: skipped — this benchmark needs a CUDA GPU and none is visible here "
              "(torch.cuda.is_available() is False).")
        return 0
    unknown = set(args.weights.split(",")) - {"bf16", "fp8"}
    if unknown:
        raise ValueError(f"--weights {sorted(unknown)} are not supported; choose from bf16, fp8")
    device = torch.device("cuda")
    config = ModelConfig(**AIR, num_hidden_layers=args.layers, torch_dtype="bfloat16")
    bandwidth = measure_bandwidth(device)
    print(f"{torch.cuda.get_device_name(device)}: copy bandwidth {bandwidth / 1e12:.2f} TB/s; "
          f"Air-shaped, {args.layers} layers, TP=1, prompt {args.prompt_len}, {args.decode_tokens} decode tokens")
    print(f"{'weights':8} {'batch':>5} {'ms/step':>8} {'tok/s':>8} {'floor ms':>9} {'of floor':>8} "
          f"{'fp8 floor ms':>12}")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(config.to_hf_dict()))
        for weights in args.weights.split(","):
            model = build_model(config, weights, device)
            max_len = args.prompt_len + args.decode_tokens + 16
            engine = LLMEngine(EngineConfig(model=folder, device="cuda", dtype="bfloat16", max_model_len=max_len,
                                            num_gpu_blocks_override=max(batches) * (max_len // 16 + 2)), model=model)
            time_decode(engine, 1, 16, 8)  # warm-up
            for batch in batches:
                seconds = time_decode(engine, batch, args.prompt_len, args.decode_tokens)
                context = args.prompt_len + args.decode_tokens // 2
                floor = step_bytes(config, batch, context, 2) / bandwidth
                fp8_floor = step_bytes(config, batch, context, 1) / bandwidth
                print(f"{weights:8} {batch:>5} {seconds * 1e3:>8.2f} {batch / seconds:>8.1f} {floor * 1e3:>9.3f} "
                      f"{floor / seconds:>8.1%} {fp8_floor * 1e3 if weights == 'fp8' else float('nan'):>12.3f}")
            del engine, model
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
