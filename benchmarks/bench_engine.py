"""glm45's engine against transformers `generate` on the same weights and dtype, in one run.

    python benchmarks/bench_engine.py                      # Air-shaped 0.6B + tiny models, bf16, CPU
    python benchmarks/bench_engine.py --models tiny --num-requests 16 --output-len 32   # a quick look

For each model it prints decode tokens/s at batch 1, total throughput for many requests of mixed prompt
lengths (transformers in static batches of 16, left-padded), and prefill tokens/s for a long prompt —
each beside transformers' figure, the ratio, and the fraction of the machine's floors:
- bandwidth floor: a decode step must read the active weights once (bytes / measured read bandwidth);
- compute floor: a step's matmul FLOPs / the best measured matmul rate for these weights.
With the bundled model (trained MTP head) it also measures MTP speculative decoding against k=0.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.floors import read_bandwidth  # noqa: E402
from benchmarks.models import active_weight_bytes, build_random_checkpoint, flops_per_token  # noqa: E402
from glm45 import LLM, SamplingParams  # noqa: E402
from glm45.config import ModelConfig  # noqa: E402
from glm45.kernels import cpu  # noqa: E402


# ---------------------------------------------------------------------- machine floors
def measure_matmul_rate(dtype: torch.dtype) -> float:
    """FLOP/s of the best path glm45 has for a [256, 1024] × [1024, 4096] product with `dtype` weights."""
    x = torch.randn(256, 1024).to(dtype)
    w = torch.randn(4096, 1024).to(dtype)
    best = 0.0
    with torch.inference_mode():
        for _ in range(5):
            start = time.perf_counter()
            cpu.linear(x, w)
            best = max(best, 2 * 256 * 1024 * 4096 / (time.perf_counter() - start))
    return best


# ---------------------------------------------------------------------- workloads
def prompts_for(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000 if vocab > 2000 else 3, vocab - 100) for _ in range(n)] for n in lengths]


def time_call(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ours_decode(llm: LLM, prompt: list[int], new_tokens: int) -> float:
    def run(n):
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        return time_call(lambda: llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False))

    run(4)  # warm-up (kernel compile, allocator)
    return (new_tokens - 1) / (run(new_tokens) - run(1))


def theirs_decode(model, prompt: list[int], new_tokens: int) -> float:
    ids = torch.tensor([prompt])

    def run(n):
        return time_call(lambda: model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                                pad_token_id=0))

    run(4)
    return (new_tokens - 1) / (run(new_tokens) - run(1))


def ours_throughput(llm: LLM, prompts: list[list[int]], output_len: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    seconds = time_call(lambda: llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False))
    return len(prompts) * output_len / seconds


def theirs_throughput(model, prompts: list[list[int]], output_len: int, batch: int = 16) -> float:
    seconds = 0.0
    for start in range(0, len(prompts), batch):
        group = prompts[start:start + batch]
        width = max(len(p) for p in group)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
        seconds += time_call(lambda ids=ids, mask=mask: model.generate(
            ids, attention_mask=mask, max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
            pad_token_id=0))
    return len(prompts) * output_len / seconds


def ours_prefill(llm: LLM, prompt: list[int]) -> float:
    params = SamplingParams(temperature=0, max_tokens=1)
    return len(prompt) / time_call(lambda: llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False))


def theirs_prefill(model, prompt: list[int]) -> float:
    ids = torch.tensor([prompt])
    return len(prompt) / time_call(lambda: model(ids, logits_to_keep=1))  # logits of the last token only


# ---------------------------------------------------------------------- report
def benchmark_model(name: str, folder: Path, args, bandwidth: float, matmul_rate: float, rows: list) -> None:
    from transformers import Glm4MoeForCausalLM as Reference

    dtype = getattr(torch, args.dtype)
    config = ModelConfig.from_pretrained(folder)
    weight_bytes = active_weight_bytes(config, dtype.itemsize)
    llm = LLM(str(folder), dtype=args.dtype, device="cpu", max_model_len=4096,
              kv_cache_memory_bytes=2 << 30, max_num_seqs=args.num_requests)
    reference = Reference.from_pretrained(folder, dtype=dtype).eval()
    lengths = [random.Random(1).randint(64, 512) for _ in range(args.num_requests)]
    prompt = prompts_for(config.vocab_size, [32])[0]
    with torch.inference_mode():
        ours = ours_decode(llm, prompt, args.decode_len)
        theirs = theirs_decode(reference, prompt, args.decode_len)
        floor = bandwidth / weight_bytes
        rows.append((name, "decode tok/s, batch 1", ours, theirs, f"{ours / floor:.0%} of BW floor"))

        prompts = prompts_for(config.vocab_size, lengths, seed=2)
        ours = ours_throughput(llm, prompts, args.output_len)
        theirs = theirs_throughput(reference, prompts, args.output_len)
        compute_floor = matmul_rate / flops_per_token(config, context=300)
        rows.append((name, f"throughput tok/s, {args.num_requests} req", ours, theirs,
                     f"{ours / compute_floor:.0%} of compute floor"))

        long_prompt = prompts_for(config.vocab_size, [args.prefill_len], seed=3)[0]
        ours = ours_prefill(llm, long_prompt)
        theirs = theirs_prefill(reference, long_prompt)
        prefill_floor = matmul_rate / flops_per_token(config, context=args.prefill_len // 2, with_head=False)
        rows.append((name, f"prefill tok/s, {args.prefill_len} tokens", ours, theirs,
                     f"{ours / prefill_floor:.0%} of compute floor"))


MTP_CONVERSATIONS = [
    ([{"role": "user", "content": "What is the weather in Paris in celsius?"}], True),
    ([{"role": "user", "content": "Convert 12 kilometers to miles."}], True),
    ([{"role": "user", "content": "What is 17 * 23?"}], False),
    ([{"role": "user", "content": "Tell me something about Berlin."}], True),
]


def benchmark_mtp(args, rows: list) -> None:
    """The bundled model answering a few chats one at a time (batch 1, greedy, stopping at its end token), with
    k = 0, 1, 2 MTP draft tokens: greedy outputs are identical, so tokens/s compare directly."""
    from glm45.engine.engine import bundled_model_path

    try:
        folder = bundled_model_path()
    except FileNotFoundError:
        print("(no bundled model: MTP speed-up not measured)")
        return
    from glm45.chat import render_chat
    from glm45.tokenizer import Tokenizer

    tools = [{"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {
        p: {"type": "string"} for p in params}}}} for name, params in (
        ("get_weather", ("city", "unit")), ("convert_units", ("value", "from_unit", "to_unit")))]
    prompts = [render_chat(messages, tools=tools, enable_thinking=thinking)
               for messages, thinking in MTP_CONVERSATIONS]
    assert Tokenizer.from_pretrained(folder)  # the bundled model ships its tokenizer
    speeds = {}
    for k in (0, 1, 2):
        llm = LLM(str(folder), dtype=args.dtype, device="cpu", num_speculative_tokens=k, max_model_len=2048)
        params = SamplingParams(temperature=0, max_tokens=args.decode_len)
        llm.generate(prompts[0], params, use_tqdm=False)  # warm-up
        generated, seconds = 0, 0.0
        for prompt in prompts:
            start = time.perf_counter()
            output = llm.generate(prompt, params, use_tqdm=False)[0]
            seconds += time.perf_counter() - start
            generated += len(output.outputs[0].token_ids)
        speeds[k] = generated / seconds
        stats = llm.engine.stats()
        note = ("" if k == 0 else
                f"accept {', '.join(f'{r:.0%}' for r in stats['spec_acceptance_rates'])}; "
                f"mean length {stats['spec_mean_accepted_length']:.2f}")
        rows.append(("bundled", f"chat tok/s, batch 1, MTP k={k}", speeds[k], speeds[0], note))


def benchmark_long_prompt(args, work: Path, rows: list) -> None:
    """A 32k-token prompt on a tiny model, through chunked prefill, in a KV cache sized to just hold it."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_checkpoints import build_reference

    folder = work / "tiny-air_like-long"
    if not (folder / "config.json").is_file():
        config = build_reference("air_like").config
        config.max_position_embeddings = 40960
        from transformers import Glm4MoeForCausalLM as Reference

        torch.manual_seed(0)
        Reference(config).to(getattr(torch, args.dtype)).save_pretrained(folder)
    length, chunk = 32768, args.max_num_batched_tokens
    llm = LLM(str(folder), dtype=args.dtype, device="cpu", max_model_len=length + 64,
              num_gpu_blocks_override=(length + 64) // 16 + 1, max_num_batched_tokens=chunk)
    prompt = prompts_for(320, [length], seed=5)[0]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    seconds = time_call(lambda: llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False))
    blocks = llm.engine.block_manager.num_blocks
    rows.append(("tiny-air_like", f"{length}-token prompt, chunks of {chunk}", length / seconds, float("nan"),
                 f"done in {seconds:.1f} s within {blocks} KV blocks ({blocks * 16} tokens)"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="air,tiny,mtp,long", help="comma list of: air, tiny, mtp, long")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--decode-len", type=int, default=64)
    parser.add_argument("--prefill-len", type=int, default=2048)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "glm45-bench"))
    args = parser.parse_args()

    bandwidth = read_bandwidth(args.threads)
    torch.set_num_threads(args.threads)
    matmul_rate = measure_matmul_rate(getattr(torch, args.dtype))
    print(f"machine: read bandwidth {bandwidth / 1e9:.1f} GB/s, best {args.dtype} matmul "
          f"{matmul_rate / 1e9:.1f} GFLOP/s, {args.threads} threads")
    rows: list = []
    work = Path(args.workdir)
    models = args.models.split(",")
    if "air" in models:
        folder = build_random_checkpoint("air-0.6b", work / "air-0.6b", getattr(torch, args.dtype))
        benchmark_model("air-0.6b", folder, args, bandwidth, matmul_rate, rows)
    if "tiny" in models:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny_checkpoints import build_reference

        for kind in ("glm45_like", "air_like"):
            folder = work / f"tiny-{kind}"
            if not (folder / "config.json").is_file():
                build_reference(kind, dtype=getattr(torch, args.dtype)).save_pretrained(folder)
            benchmark_model(f"tiny-{kind}", folder, args, bandwidth, matmul_rate, rows)
    if "mtp" in models:
        benchmark_mtp(args, rows)
    if "long" in models:
        benchmark_long_prompt(args, work, rows)

    print(f"\n{'model':<18} {'measure':<30} {'glm45':>10} {'baseline':>13} {'ratio':>7}  vs floor")
    print("(baseline: transformers generate on the same weights; for the MTP rows, glm45 with k=0)")
    for name, measure, ours, theirs, note in rows:
        print(f"{name:<18} {measure:<30} {ours:>10.1f} {theirs:>13.1f} {ours / theirs:>6.2f}×  {note}")


if __name__ == "__main__":
    main()
