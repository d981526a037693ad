"""`LLMEngine`: requests in, one batched model step at a time, outputs out.

    engine.add_request(request_id, prompt, params)   # validated here; ValueError on bad input
    while engine.has_unfinished_requests():
        for output in engine.step(): ...             # RequestOutput of every request that progressed
    engine.abort_request(request_id)                 # frees its KV blocks at once

A step reads top to bottom: the scheduler picks the batch (`scheduler.py`), the executor runs it and samples
(`executor.py`), the scheduler applies the result (`Scheduler.update`), the output processor detokenizes and
checks stop strings (`output.py`), and with MTP the executor drafts for the next step.

The engine owns the model runner (model and paged KV cache), the tokenizer (optional: without one, prompts are
token ids and outputs have no text), the scheduler, the executor and the output processor. It is synchronous
and single-threaded; the server drives it from a background thread.

With `tensor_parallel_size` N > 1 the engine is rank 0 of N processes (`workers.py`): it spawns the other ranks
(or joins them under torchrun), holds its own shard of the model and of the KV cache, and every model call of
a step runs on all ranks in lock-step. `enable_expert_parallel` partitions the routed experts over those ranks
instead of splitting each expert. `shutdown()` stops them and leaves the process group; an engine that is
garbage-collected does the same, so another parallel engine can start in the process.

Failures stay with the requests they concern: `add_request` admits all of a request's sequences or none (any
error leaves nothing behind), and a step that fails (the model, sampling, detokenizing) aborts the requests
it was running and raises `StepError` naming them; the engine goes on with the others (unless a tensor-parallel
rank is gone: then the `WorkerError` itself is raised, as no step can run any more).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from pathlib import Path

import torch

from glm45.config import EngineConfig, bundled_model_path
from glm45.engine.block_manager import BlockManager
from glm45.engine.device import resolve_device
from glm45.engine.executor import Executor
from glm45.engine.host_memory import settle_host_allocator
from glm45.engine.memory import memory_report
from glm45.engine.model_runner import ModelRunner, kv_cache_blocks
from glm45.engine.output import OutputProcessor
from glm45.engine.sampling_params import SamplingParams
from glm45.engine.scheduler import Scheduler
from glm45.engine.sequence import RequestOutput, Sequence
from glm45.model import Glm4MoeForCausalLM

logger = logging.getLogger(__name__)

__all__ = ["LLMEngine", "StepError", "bundled_model_path", "resolve_device"]


class StepError(RuntimeError):
    """A step failed; the requests it was running (`request_ids`) were aborted, the others go on."""

    def __init__(self, request_ids: list[str], cause: BaseException):
        super().__init__(f"the engine step failed ({type(cause).__name__}: {cause}); "
                         f"aborted {len(request_ids)} request(s)")
        self.request_ids = request_ids


class LLMEngine:
    def __init__(self, config: EngineConfig, model: Glm4MoeForCausalLM | None = None, tokenizer=None):
        self.config = config
        model_path = Path(config.model) if config.model else bundled_model_path()
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.model_path = model_path
        self.workers = None
        self._finalizer = None
        self._grammar = None
        self._grammar_lock = threading.Lock()
        if config.tensor_parallel_size > 1:
            if model is not None:
                raise ValueError("tensor_parallel_size > 1 loads each rank's shard from the model folder; "
                                 "pass EngineConfig.model instead of a loaded model")
            from glm45.engine.workers import WorkerGroup

            self.workers = WorkerGroup.start(config, model_path)  # under torchrun, only rank 0 returns
            self._finalizer = weakref.finalize(self, self.workers.shutdown)
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
            model = Glm4MoeForCausalLM.from_pretrained(
                model_path, dtype=config.dtype, device=self.device, load_mtp=config.num_speculative_tokens > 0,
                parallelize=self.workers.parallelize if self.workers else None, quantization=config.quantization,
                lm_head_quantization=config.lm_head_quantization, share_mtp_copies=True)
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
        num_cache_layers = self.model_config.num_hidden_layers + (1 if k else 0)
        num_blocks = kv_cache_blocks(config, model, self.device, num_cache_layers, profile=self.workers is None)
        lookahead = 2 * k
        capacity = num_blocks * config.block_size - lookahead
        max_model_len = config.max_model_len or min(self.model_config.max_position_embeddings, capacity)
        if max_model_len > capacity:
            raise ValueError(
                f"max_model_len={max_model_len} does not fit the KV cache: {num_blocks} blocks of "
                f"{config.block_size} tokens hold {capacity} tokens; raise the KV budget or lower max_model_len"
            )
        if max_model_len < 2:
            raise ValueError(f"the KV cache holds only {num_blocks} blocks, too few to run anything")
        self.max_model_len = max_model_len
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching, mtp=bool(k))
        if self.workers is not None:
            self.runner = self.workers.runner(model, num_blocks, num_cache_layers)
        else:
            self.runner = ModelRunner.create(model, num_blocks, num_cache_layers, config.block_size,
                                             config.kv_cache_dtype)
            if not config.enforce_eager:
                self.runner.capture(max_model_len + lookahead, config.cuda_graph_sizes, config.num_scheduler_steps)
        self.kv_cache = self.runner.kv_cache
        self.adapters = None
        if config.enable_lora:
            if self.workers is not None:
                raise ValueError("LoRA adapters are served on one device; --enable-lora does not work with "
                                 "--tensor-parallel-size > 1")
            from glm45.engine.lora import AdapterSet

            self.adapters = self.runner.adapters = AdapterSet(model, config.max_loras, config.max_lora_rank)
        self.executor = Executor(self.runner, self.block_manager, k, max_model_len)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   max_model_len, k)
        self.output_processor = OutputProcessor(tokenizer, speculative=bool(k))
        self.requests: dict[str, list[Sequence]] = {}
        self._seed_counter = config.seed
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.memory = memory_report(model, self.kv_cache, config.block_size)
        logger.info("memory: %s", self.memory.describe())
        settle_host_allocator()
        parallel = ""
        if self.workers is not None:
            parallel = f", tensor parallel ×{config.tensor_parallel_size}"
            parallel += " with expert parallelism" if config.enable_expert_parallel else ""
        logger.info("engine ready: %s on %s, %d KV blocks × %d tokens, max_model_len %d%s%s", model_path,
                    self.device, num_blocks, config.block_size, max_model_len, f", MTP k={k}" if k else "", parallel)

    def weights_updated(self) -> None:
        """Call after changing the model's weights in place (RL updates): the prefix cache is dropped, and the
        captured decode step, which holds converted copies of some weights, is captured again."""
        self.block_manager.reset_prefix_cache()
        if self.runner.captured is not None:
            self.runner.captured = None
            self.runner.capture(self.max_model_len + 2 * self.num_speculative_tokens, self.config.cuda_graph_sizes,
                                self.config.num_scheduler_steps)

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any, and leave the process group (idempotent; also run when the
        engine is garbage-collected and at interpreter exit)."""
        if self._finalizer is not None:
            self._finalizer()

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

    @property
    def grammar(self):
        """The grammar engine of constrained decoding (`glm45.grammar.GrammarBackend`), built on first use (it reads
        the whole vocabulary); the server's request checks compile with it too, from worker threads."""
        with self._grammar_lock:
            if self._grammar is None:
                if self.tokenizer is None:
                    raise ValueError("constrained decoding (structured outputs, tool-call constraints, thinking "
                                     "budgets) needs a tokenizer, and this model has none")
                from glm45.grammar import GrammarBackend

                self._grammar = GrammarBackend(self.tokenizer, self.model_config.vocab_size)
            return self._grammar

    @property
    def eos_token_ids(self) -> list[int]:
        if self.tokenizer is not None:
            return self.tokenizer.eos_token_ids
        return list(self.model_config.eos_token_id)

    # ------------------------------------------------------------------ requests
    def add_lora(self, request) -> int:
        """Load a LoRA adapter (`LoRARequest`) into a free slot, or find its slot; returns the slot."""
        if self.adapters is None:
            raise ValueError("this engine serves no LoRA adapters; start it with enable_lora=True (--enable-lora)")
        return self.adapters.slot_of(request)

    def list_loras(self) -> list:
        return list(self.adapters.requests.values()) if self.adapters is not None else []

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None, lora_request=None) -> None:
        """Queue a request (validated here; ValueError on bad input). `lora_request`: a
        `glm45.engine.lora.LoRARequest` whose adapter this request runs with (loaded on first use)."""
        params = params or SamplingParams()
        lora_slot = self.add_lora(lora_request) if lora_request is not None else -1
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
        bad = [t for t in params.logit_bias or () if t >= vocab]
        if bad:
            raise ValueError(f"logit_bias token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        constrained = params.structured_outputs is not None or params.thinking_budget is not None

        # Every sequence of the request is built before any enters the engine, and if entering fails part-way,
        # what entered is taken out again: a request is admitted whole or not at all.
        now = time.monotonic() if arrival_time is None else arrival_time
        seqs = [Sequence(request_id, prompt_ids, params, self.eos_token_ids, self._generator(params, index), index,
                         now) for index in range(params.n)]
        for seq in seqs if constrained else ():  # GrammarError (a ValueError) for a grammar that cannot compile
            seq.constraint = self.grammar.constraint(params.structured_outputs, prompt_ids, params.thinking_budget,
                                                     params.max_tokens or self.max_model_len - len(prompt_ids))
        try:
            self.requests[request_id] = seqs
            self.output_processor.add_request(request_id, prompt_text, seqs)
            for seq in seqs:
                if lora_slot >= 0:
                    seq.lora_slot, seq.cache_salt = lora_slot, f"lora:{lora_request.lora_name}".encode()
                self.scheduler.add(seq)
        except BaseException:
            self._discard(request_id, seqs)
            raise
        self.num_prompt_tokens += len(prompt_ids) * params.n

    def _generator(self, params: SamplingParams, index: int) -> torch.Generator | None:
        """The random stream of one sampled completion: the request's seed + index, or the engine's own. It lives on
        the host (the sampler copies each step's uniforms to the device without waiting)."""
        if params.greedy:
            return None
        generator = torch.Generator()
        if params.seed is not None:
            generator.manual_seed((params.seed + index) % 2**64)  # any int64 seed, wrapped as torch takes it
        else:
            self._seed_counter += 1
            generator.manual_seed(hash((self.config.seed, self._seed_counter)) & (2**63 - 1))
        return generator

    def abort_request(self, request_id: str) -> bool:
        seqs = self.requests.get(request_id)
        if seqs is None:
            self.output_processor.remove_request(request_id)
            return False
        for seq in seqs:
            if not seq.is_finished:
                seq.finish("abort")
        self._discard(request_id, seqs)
        return True

    def _discard(self, request_id: str, seqs: list[Sequence]) -> None:
        """Take a request out of every part of the engine (those it never entered included) and free its blocks."""
        self.requests.pop(request_id, None)
        self.output_processor.remove_request(request_id)
        for seq in seqs:
            self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def has_runnable_requests(self) -> bool:
        """True when a step would do something: unfinished requests, not all of them paused."""
        return self.scheduler.has_runnable()

    def pause_request(self, request_id: str) -> None:
        """Stop scheduling a request (its reader is behind); it keeps its KV blocks. No-op if unknown."""
        for seq in self.requests.get(request_id, ()):
            self.scheduler.pause(seq)

    def resume_request(self, request_id: str) -> None:
        for seq in self.requests.get(request_id, ()):
            self.scheduler.resume(seq)

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        if self.workers is not None:
            self.workers.check()  # a rank is gone, or shut down: refuse every step, even one with nothing to run
        batch = self.scheduler.schedule()
        if not batch:
            return []
        try:
            return self._run_step(batch)
        except Exception as e:
            # Only the batch's requests saw the failure (their K/V and tokens may be half-written): abort them.
            request_ids = list(dict.fromkeys(item.seq.request_id for item in batch))
            logger.exception("engine step failed; aborting its %d request(s)", len(request_ids))
            self.executor.reset()
            for request_id in request_ids:
                self.abort_request(request_id)
            for item in batch:  # sequences of requests that finished in this step before it failed
                self.scheduler.finish(item.seq)
            if self.workers is not None and (self.workers.failure is not None or self.workers.closed):
                raise  # a tensor-parallel rank is gone (WorkerError): nothing can run any more
            raise StepError(request_ids, e) from e

    def _run_step(self, batch) -> list[RequestOutput]:
        before = sum(len(item.seq) for item in batch)
        result = self.executor.execute(batch)
        seqs = self.scheduler.update(batch, result)
        outputs, stopped = self.output_processor.process(seqs)
        # Drafting comes before the finished sequences' blocks are freed: it writes their MTP K/V too (prefix cache).
        drafts = self.executor.propose_drafts() if self.num_speculative_tokens else []
        for seq in dict.fromkeys([*stopped, *(seq for seq in seqs if seq.is_finished)]):
            self.scheduler.finish(seq)
        self.num_generation_tokens += sum(len(seq) for seq in seqs) - before
        for output in outputs:
            if output.finished:
                del self.requests[output.request_id]
        if self.num_speculative_tokens:
            self.scheduler.set_drafts(drafts)
        return outputs

    # ------------------------------------------------------------------ statistics
    def stats(self) -> dict:
        spec = self.executor.stats
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
            "weight_bytes": self.memory.weight_bytes,
            "kv_cache_bytes": self.memory.kv_cache_bytes,
        }
