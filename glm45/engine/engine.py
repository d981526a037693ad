"""`LLMEngine`: requests in, one batched model step at a time, outputs out.

    engine.add_request(request_id, prompt, params)   # validated here; ValueError on bad input
    while engine.has_unfinished_requests():
        for output in engine.step(): ...             # RequestOutput of every request that progressed
    engine.abort_request(request_id)                 # frees its KV blocks at once

The engine owns the model, the tokenizer (optional: without one, prompts are token ids and outputs
have no text), the paged KV cache, the scheduler and the runner. It is synchronous and single-threaded;
the server drives it from a background thread.

With `tensor_parallel_size` N > 1 the engine is rank 0 of N processes (glm45/parallel/workers.py): it
spawns the other ranks (or joins them under torchrun), holds its own shard of the model and of the KV
cache, and every model call of a step runs on all ranks in lock-step. `enable_expert_parallel` partitions
the routed experts over those ranks instead of splitting each expert. Call `shutdown()` to stop them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from glm45.config import EngineConfig
from glm45.engine.executor import ModelExecutor
from glm45.engine.kv_cache import BlockManager, allocate_kv_cache, kv_bytes_per_block
from glm45.engine.runner import ModelRunner
from glm45.engine.sampling_params import SamplingParams
from glm45.engine.scheduler import Scheduler
from glm45.engine.sequence import RequestOutput, Sequence
from glm45.model import Glm4MoeForCausalLM
from glm45.model.loader import load_model

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_CPU_KV_BYTES = 1 << 30


def bundled_model_path() -> Path:
    """The small trained model that ships with the package (the first checkpoint folder in assets/)."""
    candidates = sorted(p.parent for p in ASSETS.glob("*/config.json")) if ASSETS.is_dir() else []
    if not candidates:
        raise FileNotFoundError(f"no bundled model in {ASSETS}; pass a model folder explicitly")
    return candidates[0]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available")
    return resolved


class LLMEngine:
    def __init__(self, config: EngineConfig, model: Glm4MoeForCausalLM | None = None, tokenizer=None):
        self.config = config
        model_path = Path(config.model) if config.model else bundled_model_path()
        self.model_path = model_path
        self.workers = None
        if config.tensor_parallel_size > 1:
            if model is not None:
                raise ValueError("tensor_parallel_size > 1 loads each rank's shard from the model folder; "
                                 "pass EngineConfig.model instead of a loaded model")
            from glm45.parallel.workers import WorkerGroup

            self.workers = WorkerGroup.start(config, model_path)  # under torchrun, only rank 0 returns
            self.device = self.workers.device
        else:
            self.device = resolve_device(config.device)
        try:
            self._setup(config, model_path, model, tokenizer)
        except BaseException:
            self.shutdown()
            raise

    def _setup(self, config: EngineConfig, model_path: Path, model: Glm4MoeForCausalLM | None, tokenizer) -> None:
        if model is None:
            model = load_model(model_path, dtype=config.dtype, device=self.device,
                               load_mtp=config.num_speculative_tokens > 0,
                               parallelize=self.workers.parallelize if self.workers else None)
        self.model = model.eval()
        self.model_config = model.config
        if tokenizer is None:
            tokenizer = self._load_tokenizer(Path(config.tokenizer) if config.tokenizer else model_path)
        self.tokenizer = tokenizer

        k = config.num_speculative_tokens
        if k and model.mtp is None:
            raise ValueError(
                f"num_speculative_tokens={k} needs the checkpoint's MTP layer, and {model_path} has none"
            )
        self.num_speculative_tokens = k
        enable_prefix_caching = config.enable_prefix_caching and not k
        if config.enable_prefix_caching and k:
            # The MTP layer's K/V at a block's last position depends on the next block's first token,
            # so blocks cannot be shared by prefix alone while MTP runs.
            logger.info("prefix caching is off while MTP speculative decoding is on")

        mc = self.model_config
        num_cache_layers = mc.num_hidden_layers + (1 if k else 0)
        dtype = model.dtype
        kv_heads = model.model.layers[0].self_attn.num_kv_heads  # this rank's share under tensor parallelism
        per_block = kv_bytes_per_block(num_cache_layers, config.block_size, kv_heads, mc.head_dim, dtype)
        if config.num_gpu_blocks_override:
            num_blocks = config.num_gpu_blocks_override
        else:
            budget = config.kv_cache_memory_bytes or self._default_kv_budget()
            num_blocks = budget // per_block
        lookahead = 2 * k
        capacity = num_blocks * config.block_size - lookahead
        max_model_len = config.max_model_len or min(mc.max_position_embeddings, capacity)
        if max_model_len > capacity:
            raise ValueError(
                f"max_model_len={max_model_len} does not fit the KV cache: {num_blocks} blocks of "
                f"{config.block_size} tokens hold {capacity} tokens; raise the KV budget or lower max_model_len"
            )
        if max_model_len < 2:
            raise ValueError(f"the KV cache holds only {num_blocks} blocks, too few to run anything")
        self.max_model_len = max_model_len
        self.block_manager = BlockManager(num_blocks, config.block_size, enable_prefix_caching)
        self.kv_cache = allocate_kv_cache(num_cache_layers, num_blocks, config.block_size, kv_heads,
                                          mc.head_dim, dtype, self.device)
        if self.workers is not None:
            executor = self.workers.executor(model, self.kv_cache, num_cache_layers)
        else:
            executor = ModelExecutor(model, self.kv_cache, config.block_size)
        self.runner = ModelRunner(executor, self.block_manager, max_model_len, k)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens, k)
        self.requests: dict[str, list[Sequence]] = {}
        self.prompts: dict[str, str | None] = {}
        self._seed_counter = config.seed
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        parallel = ""
        if self.workers is not None:
            parallel = f", tensor parallel ×{config.tensor_parallel_size}"
            parallel += " with expert parallelism" if config.enable_expert_parallel else ""
        logger.info("engine ready: %s on %s, %d KV blocks × %d tokens, max_model_len %d%s%s", model_path,
                    self.device, num_blocks, config.block_size, max_model_len, f", MTP k={k}" if k else "", parallel)

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (idempotent; also run at interpreter exit)."""
        if self.workers is not None:
            self.workers.shutdown()

    def check_health(self) -> None:
        """Raise `WorkerError` if a tensor-parallel worker is gone (cheap, for health checks: the engine
        itself only notices at its next step)."""
        if self.workers is not None:
            self.workers.check()

    # ------------------------------------------------------------------ setup helpers
    @staticmethod
    def _load_tokenizer(folder: Path):
        if not (folder / "tokenizer.json").is_file():
            logger.info("no tokenizer in %s: prompts must be token ids and outputs carry no text", folder)
            return None
        from glm45.tokenizer import Tokenizer

        return Tokenizer.from_pretrained(folder)

    def _default_kv_budget(self) -> int:
        if self.device.type == "cuda":
            # vLLM's meaning: the whole process may use this share of the GPU; the KV cache gets what the
            # weights and a margin for activations leave of it.
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            return max(0, int(total * self.config.gpu_memory_utilization - used - 0.05 * total))
        return DEFAULT_CPU_KV_BYTES

    @property
    def eos_token_ids(self) -> list[int]:
        if self.tokenizer is not None:
            return self.tokenizer.eos_token_ids
        return list(self.model_config.eos_token_id)

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompt token ids instead of text")
            prompt_text, prompt_ids = prompt, self.tokenizer.encode(prompt)
        else:
            prompt_text, prompt_ids = None, [int(t) for t in prompt]
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens, but max_model_len is {self.max_model_len}; "
                "at least one token must remain for the output"
            )
        if params.max_tokens is not None and len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                f"max_model_len ({self.max_model_len})"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; use stop_token_ids with this model")

        now = time.monotonic() if arrival_time is None else arrival_time
        seqs = []
        for index in range(params.n):
            generator = None
            if not params.greedy:
                generator = torch.Generator(device=self.device)
                if params.seed is not None:
                    generator.manual_seed(params.seed + index)
                else:
                    self._seed_counter += 1
                    generator.manual_seed(hash((self.config.seed, self._seed_counter)) & (2**63 - 1))
            detokenizer = None
            if self.tokenizer is not None:
                from glm45.tokenizer import IncrementalDetokenizer

                detokenizer = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
            seq = Sequence(request_id, prompt_ids, params, self.eos_token_ids, detokenizer, generator, index)
            seq.arrival_time = now
            seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = seqs
        self.prompts[request_id] = prompt_text
        self.num_prompt_tokens += len(prompt_ids) * params.n

    def abort_request(self, request_id: str) -> bool:
        seqs = self.requests.pop(request_id, None)
        self.prompts.pop(request_id, None)
        if seqs is None:
            return False
        for seq in seqs:
            if not seq.is_finished:
                seq.finish("abort")
            self.scheduler.finish(seq)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        before = {item.seq.seq_id: len(item.seq) for item in batch}
        self.runner.execute(batch)
        now = time.monotonic()
        touched: dict[str, None] = {}
        for item in batch:
            seq = item.seq
            new = len(seq) - before[seq.seq_id]
            self.num_generation_tokens += new
            if new and seq.first_token_time is None:
                seq.first_token_time = now
            if seq.is_finished:
                self.scheduler.finish(seq)
            touched[seq.request_id] = None
        outputs = []
        for request_id in touched:
            seqs = self.requests.get(request_id)
            if seqs is None:
                continue
            output = self._output(request_id, seqs)
            if output.finished:
                del self.requests[request_id]
                del self.prompts[request_id]
            outputs.append(output)
        return outputs

    def _output(self, request_id: str, seqs: list[Sequence]) -> RequestOutput:
        return RequestOutput(
            request_id=request_id,
            prompt=self.prompts.get(request_id),
            prompt_token_ids=seqs[0].token_ids[: seqs[0].num_prompt_tokens],
            outputs=[seq.completion() for seq in seqs],
            finished=all(seq.is_finished for seq in seqs),
            num_cached_tokens=seqs[0].num_cached_tokens,
            metrics={"spec_draft_tokens": sum(seq.num_draft_tokens for seq in seqs),
                     "spec_accepted_tokens": sum(seq.num_accepted_tokens for seq in seqs)}
            if self.num_speculative_tokens else {},
        )

    # ------------------------------------------------------------------ statistics
    def stats(self) -> dict:
        spec = self.runner.stats
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_cache_usage": self.block_manager.usage,
            "num_free_blocks": self.block_manager.num_free_blocks,
            "num_blocks": self.block_manager.num_blocks,
            "prefix_cache_queries": self.block_manager.prefix_queries,
            "prefix_cache_hits": self.block_manager.prefix_hits,
            "num_preemptions": self.scheduler.num_preemptions,
            "prompt_tokens": self.num_prompt_tokens,
            "generation_tokens": self.num_generation_tokens,
            "spec_acceptance_rates": spec.acceptance_rates if self.num_speculative_tokens else [],
            "spec_mean_accepted_length": spec.mean_accepted_length if self.num_speculative_tokens else 0.0,
        }
