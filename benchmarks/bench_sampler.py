"""Sampling cost per step: the sampler on 1 and 64 rows, for common parameter sets, on GLM-4.5's vocabulary size
(151,552) with peaked and flat synthetic logits, and on the bundled model's own logits; on CPUs both the host kernel
(csrc/sample.c, what the engine runs there) and the batched tensor path (what it runs on GPUs), alternating.

    python benchmarks/bench_sampler.py [--threads 2] [--repeats 5]

Prints the median time per call with its range. Peaked logits (N(0, 4²)) keep a top-p nucleus within the largest
1,024 logits, the common case of a trained model; flat ones (N(0, 1)) spill over to a sort of the vocabulary.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glm45.chat import render_chat  # noqa: E402
from glm45.config import bundled_model_path  # noqa: E402
from glm45.engine import sampler as sampler_module  # noqa: E402
from glm45.engine.sampler import Sampler  # noqa: E402
from glm45.engine.sampling_params import SamplingParams  # noqa: E402
from glm45.engine.sequence import Sequence  # noqa: E402
from glm45.model import Glm4MoeForCausalLM  # noqa: E402
from glm45.tokenizer import Tokenizer  # noqa: E402

PARAMS = {"top_p 0.95, t 0.6": SamplingParams(temperature=0.6, top_p=0.95),
          "top_k 40, t 0.7": SamplingParams(temperature=0.7, top_k=40),
          "t 1.0": SamplingParams(temperature=1.0),
          "repetition 1.1, top_p 0.9": SamplingParams(repetition_penalty=1.1, top_p=0.9)}


def bundled_logits(rows: int) -> torch.Tensor:
    """The bundled model's logits at the last `rows` positions of a chat answer."""
    path = bundled_model_path()
    model = Glm4MoeForCausalLM.from_pretrained(path, dtype="float32", progress=False).eval()
    text = render_chat([{"role": "user", "content": "What is the weather like in Paris, and do I need an umbrella?"}])
    answer = ("<think></think>\nThe weather in Paris today is mild with a chance of rain in the afternoon, so bring "
              "an umbrella just in case, and a light jacket for the evening when it gets cooler by the river.")
    ids = Tokenizer.from_pretrained(path).encode(text + answer)
    with torch.inference_mode():
        return model(torch.tensor([ids]))[0, -rows:].float()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sources = {"bundled model": bundled_logits(64),
               "peaked 151k": torch.randn(64, 151552, generator=torch.Generator().manual_seed(0)) * 4,
               "flat 151k": torch.randn(64, 151552, generator=torch.Generator().manual_seed(1))}
    sampler = Sampler()
    paths = {"host": True, "tensors": False} if sampler_module.on_host(torch.zeros(1)) else {"tensors": False}
    print(f"sampler, {args.threads} threads, median (range) of {args.repeats} calls per path, the paths alternating")
    for source, logits in sources.items():
        for label, params in PARAMS.items():
            for rows in (1, 64):
                seqs = [Sequence(f"r{i}", list(range(200)), params, [0], torch.Generator().manual_seed(i))
                        for i in range(rows)]
                batch = logits[:rows].contiguous()
                times: dict[str, list[float]] = {path: [] for path in paths}
                for repeat in range(args.repeats + 1):
                    for path, host in paths.items():
                        sampler_module.HOST_KERNEL = host
                        start = time.perf_counter()
                        sampler(batch, seqs)
                        if repeat:  # the first call of each path warms it up
                            times[path].append((time.perf_counter() - start) * 1e3)
                figures = "  ".join(f"{path} {statistics.median(t):7.3f} ms ({min(t):.3f}–{max(t):.3f})"
                                    for path, t in times.items())
                print(f"  {source:14s} {label:26s} rows {rows:3d}: {figures}", flush=True)
    sampler_module.HOST_KERNEL = True
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
