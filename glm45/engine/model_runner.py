"""The model's side of an engine step: the model and its paged KV cache, forward passes from plain inputs.

The executor (`executor.py`) decides what to compute — token ids, positions, slot mapping, per-sequence
slices, which rows need logits — and samples; the model runner owns the model and its KV cache and computes.
The split exists for tensor parallelism: every rank runs a model runner over its own shard of the model and
of the KV cache, and rank 0 forwards each call's plain inputs to the others (`workers.py`), so the scheduler,
the sequences and the sampler live only on rank 0.

The hidden states of one step stay here between its calls: the target forward keeps its final hidden
states, the first MTP draft reads rows of them, and each later draft step carries the previous one's.

KV-cache sizing (`kv_cache_blocks`) is here too, since it is the model's memory that bounds it.
"""

from __future__ import annotations

import logging

import torch

from glm45.engine.attention import PagedAttention, SeqSlice, StepInputs
from glm45.engine.host_memory import lazily_zeroed

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_BYTES = 1 << 30
CUDA_ACTIVATION_MARGIN = 0.05  # share of the GPU kept for activations when they are not measured (TP)


def kv_bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                       dtype: torch.dtype) -> int:
    return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize


def allocate_kv_cache(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                      dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The paged KV cache, zeroed. On the host its pages become resident as blocks are first written."""
    shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
    if torch.device(device).type == "cpu":
        return lazily_zeroed(shape, dtype)
    return torch.zeros(shape, dtype=dtype, device=device)


def kv_dtype(kv_cache_dtype: str, model) -> torch.dtype:
    """The KV cache's element type: the model's dtype ("auto"), or e4m3 ("fp8", "fp8_e4m3")."""
    return model.dtype if kv_cache_dtype == "auto" else torch.float8_e4m3fn


def local_kv_heads(model) -> int:
    """KV heads this rank caches (its share under tensor parallelism, or the one replicated head)."""
    return model.model.layers[0].self_attn.num_kv_heads


def kv_cache_blocks(config, model, device: torch.device, num_cache_layers: int, profile: bool = True) -> int:
    """How many KV blocks the cache gets: `num_gpu_blocks_override`, else the byte budget divided by the bytes of
    one block. The budget: `kv_cache_memory_bytes`; or on CUDA what `gpu_memory_utilization` of the GPU leaves
    after everything allocated so far and the activations of the largest step, measured by running that step
    (`profile_step`; under tensor parallelism, where one rank cannot run a forward alone, a fixed share is kept
    instead); or a fixed default on CPU."""
    if config.num_gpu_blocks_override:
        return config.num_gpu_blocks_override
    per_block = kv_bytes_per_block(num_cache_layers, config.block_size, local_kv_heads(model),
                                   model.config.head_dim, kv_dtype(config.kv_cache_dtype, model))
    budget = config.kv_cache_memory_bytes
    if budget is None and device.type == "cuda":
        activations = profiled_activation_bytes(config, model, device, num_cache_layers) if profile else None
        free, total = torch.cuda.mem_get_info(device)
        budget = cuda_kv_budget(total, free, config.gpu_memory_utilization, activations)
        logger.info("KV budget %.2f GiB: %.0f%% of %.1f GiB less %.2f GiB in use and %s", budget / 2**30,
                    100 * config.gpu_memory_utilization, total / 2**30, (total - free) / 2**30,
                    "a 5% margin" if activations is None else f"{activations / 2**30:.2f} GiB of measured activations")
    elif budget is None:
        budget = DEFAULT_CPU_KV_BYTES
    return budget // per_block


def cuda_kv_budget(total: int, free: int, utilization: float, activations: int | None) -> int:
    """vLLM's meaning: the whole process may use `utilization` of the GPU; the KV cache gets what is left after
    what is in use now and the step's activations (or a 5% margin when they were not measured)."""
    reserve = total * CUDA_ACTIVATION_MARGIN if activations is None else activations
    return max(0, int(total * utilization - (total - free) - reserve))


def profile_step(config, model, num_cache_layers: int) -> int:
    """Run the largest step the scheduler can make — `max_num_batched_tokens` prompt tokens in one forward over a
    cache just large enough, float32 logits for `max_num_seqs` rows and their top-p distributions (a sort of the
    vocabulary) — and return the bytes of the cache it used (the caller subtracts them from the peak)."""
    from glm45.engine.sampler import distributions
    from glm45.engine.sampling_params import SamplingParams

    tokens, block = config.max_num_batched_tokens, config.block_size
    blocks = -(-tokens // block)
    kv_cache = allocate_kv_cache(num_cache_layers, blocks + 1, block, local_kv_heads(model), model.config.head_dim,
                                 kv_dtype(config.kv_cache_dtype, model), model.device)
    runner = ModelRunner(model, kv_cache, block)
    rows = min(config.max_num_seqs, tokens)
    inputs = StepInputs([0] * tokens, list(range(tokens)), list(range(tokens)),
                        [SeqSlice(0, tokens, tokens, list(range(blocks)))])
    logits = runner.forward(inputs, list(range(tokens - rows, tokens)))
    distributions(logits, [SamplingParams(top_p=0.95)] * rows)
    return kv_cache.numel() * kv_cache.element_size()


def profiled_activation_bytes(config, model, device: torch.device, num_cache_layers: int) -> int:
    """The peak bytes `profile_step` allocates beyond its own cache, from the CUDA allocator's statistics."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    cache_bytes = profile_step(config, model, num_cache_layers)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before - cache_bytes
    torch.cuda.empty_cache()
    return max(0, peak)


class ModelRunner:
    def __init__(self, model, kv_cache: torch.Tensor, block_size: int):
        self.model = model
        # [layers, 2, blocks + 1, block_size, local kv heads, head_dim]: the last block is scratch for the padding
        # rows of captured steps; the block manager never hands it out.
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.scratch_block = kv_cache.shape[2] - 1
        self.device = model.device
        self.hidden: torch.Tensor | None = None        # the last target forward's final hidden states [N, D]
        self._draft_hidden: torch.Tensor | None = None  # the last MTP step's normalised h' at its logit rows
        self._draft_pick = None                         # or (h', rows) of a captured step, picked when asked for
        self.captured = None                           # the captured decode step, when enabled
        self.adapters = None                           # LoRA adapters served per request (engine/lora.py)
        if self.device.type == "cuda":  # the grouped-GEMM MoE: no host syncs, launches independent of routing
            from glm45.engine.captured_cuda import use_sync_free_experts

            use_sync_free_experts(model)

    @classmethod
    def create(cls, model, num_blocks: int, num_cache_layers: int, block_size: int,
               kv_cache_dtype: str = "auto") -> ModelRunner:
        kv_cache = allocate_kv_cache(num_cache_layers, num_blocks + 1, block_size, local_kv_heads(model),
                                     model.config.head_dim, kv_dtype(kv_cache_dtype, model), model.device)
        return cls(model, kv_cache, block_size)

    def capture(self, max_model_len: int, sizes: list[int] | None = None, max_steps: int = 1) -> None:
        """Capture the decode step for these row counts: CUDA graphs on GPUs (captured_cuda.py), a program of C
        kernels on CPUs (captured_cpu.py), there also as a run of up to `max_steps` decode steps in one call. A
        model or machine it cannot run on, or a capture that fails, leaves the eager path with one warning."""
        if self.device.type == "cuda":
            from glm45.engine import captured_cuda as captured
        else:
            from glm45.engine import captured_cpu as captured

            reason = captured.supported(self.model, self.kv_cache)
            if reason is not None:
                logger.info("decode step not captured: %s", reason)
                return
        try:
            if self.device.type == "cuda":
                self.captured = captured.CapturedCudaDecode(self.model, self.kv_cache, self.block_size,
                                                            self.scratch_block, max_model_len,
                                                            sizes or captured.default_sizes())
            else:
                self.captured = captured.CapturedDecode(self.model, self.kv_cache, self.block_size,
                                                        self.scratch_block, max_model_len,
                                                        sizes or captured.default_sizes(), max_steps)
            self._capture_args = (max_model_len, sizes, max_steps)
        except Exception as e:  # a capture that fails must never take the engine down
            logger.warning("could not capture the decode step (%s: %s); running eagerly", type(e).__name__, e)
            self.captured = None

    def _captured_rows(self, rows: int) -> bool:
        return self.captured is not None and self.captured.size_for(rows) is not None

    def _captured_adapters(self) -> bool:
        """Whether the captured step serves adapter rows: on CPUs, once its programs include every adapted layer
        (captured again when an adapter adapts a layer no earlier one did); CUDA graphs hold base weights only."""
        if self.device.type == "cuda":
            return False
        if not self.captured.serves_adapters_of(self.model):
            self.captured = None
            self.capture(*self._capture_args)
        return self.captured is not None

    @property
    def has_mtp(self) -> bool:
        return self.model.mtp is not None

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _context(self, inputs: StepInputs) -> PagedAttention:
        return PagedAttention(self.kv_cache, self._tensor(inputs.slot_mapping), inputs.slices, self.block_size)

    @torch.inference_mode()
    def forward(self, inputs: StepInputs, logit_rows: list[int]) -> torch.Tensor | None:
        """The target model over `inputs` (its K/V written to the cache) → float32 logits at `logit_rows`."""
        captured = self._captured_rows(len(inputs.token_ids))
        if inputs.adapter_ids is not None and not (captured and self._captured_adapters()):
            self.adapters.begin(inputs.adapter_ids, self.device)
            try:  # rows with adapters the captured step cannot serve: the eager forward, through the wrapped layers
                return self._eager_forward(inputs, logit_rows)
            finally:
                self.adapters.end()
        if captured:
            logits, self.hidden = self.captured.forward(inputs, logit_rows)
            return logits
        return self._eager_forward(inputs, logit_rows)

    def _eager_forward(self, inputs: StepInputs, logit_rows: list[int]) -> torch.Tensor | None:
        ctx = self._context(inputs)
        self.hidden = self.model.hidden_states(self._tensor(inputs.token_ids), self._tensor(inputs.positions), ctx)
        if not logit_rows:
            return None
        return self.model.compute_logits(self.hidden[self._tensor(logit_rows)]).float()

    @torch.inference_mode()
    def logits(self, rows: list[int]) -> torch.Tensor:
        """Float32 logits of the last target forward at more `rows` (prompt log-probabilities, a block at a time)."""
        return self.model.compute_logits(self.hidden[self._tensor(rows)]).float()

    def max_decode_steps(self, rows: int, draft: bool = False) -> int:
        """How many decode steps of `rows` rows `decode_steps` (or, `draft`, MTP steps `draft_step_run`) runs in one
        call (1: it does not run them)."""
        programs = getattr(self.captured, "draft_step_runs" if draft else "decode_step_programs", None)
        if not self._captured_rows(rows) or self.captured.size_for(rows) not in (programs or {}):
            return 1
        return self.captured.max_steps

    @torch.inference_mode()
    def decode_steps(self, inputs: StepInputs, steps: int, sampled: dict, until: list) -> list[list[int]]:
        """Several decode steps in one captured call (CapturedDecode.decode_steps): each row's tokens, one per step
        run."""
        tokens, self.hidden = self.captured.decode_steps(inputs, steps, sampled, until)
        return tokens

    def runs_draft_step(self, rows: int) -> bool:
        """Whether `draft_step` runs `rows` rows (the captured CPU step, with an MTP layer)."""
        return self._captured_rows(rows) and self.captured.size_for(rows) in getattr(self.captured, "draft_steps", {})

    @torch.inference_mode()
    def draft_step(self, inputs: StepInputs, sampled: dict, token_masks: dict | None = None
                   ) -> tuple[list[int], list[bool], list[int], torch.Tensor, torch.Tensor]:
        """Verification of one draft per sequence and the next draft, in one captured program (rows [x_n, d] per
        sequence; see cpu_step_programs.build_draft_step and CapturedDecode.draft_step): (each row's token, whether
        each sequence's draft was accepted, the next drafts by row, the sampled sequences' draft distributions, the
        rows' draft logits). `token_masks`: {row: a constraint's bitmask for that row's token}."""
        targets, accepted, drafts, q, draft_logits, self.hidden = self.captured.draft_step(inputs, sampled,
                                                                                           token_masks)
        self._draft_hidden = self._draft_pick = None
        return targets, accepted, drafts, q, draft_logits

    @torch.inference_mode()
    def draft_step_run(self, inputs: StepInputs, steps: int, sampled: dict, until: list
                       ) -> tuple[list[list[list[int]]], list[int], torch.Tensor]:
        """Several MTP steps in one captured call (CapturedDecode.draft_step_run): (each sequence's tokens per step
        run, each sequence's next draft, the sampled sequences' next draft distributions)."""
        per_step, drafts, q, self.hidden = self.captured.draft_step_run(inputs, steps, sampled, until)
        self._draft_hidden = self._draft_pick = None
        return per_step, drafts, q

    @torch.inference_mode()
    def draft(self, inputs: StepInputs, hidden_rows: list[int] | None, logit_rows: list[int]) -> torch.Tensor | None:
        """One MTP step over `inputs` (its K/V written to the MTP layer's cache) → float32 logits at `logit_rows`.

        The hidden input pairs with each token: rows `hidden_rows` of the last target forward, or, when None,
        the previous draft step's h' (one row per token, in order). The new h' is kept at `logit_rows`."""
        if self._captured_rows(len(inputs.token_ids)):
            if hidden_rows is None:
                logits, h = self.captured.draft(inputs, self.draft_hidden, None, logit_rows)
            else:
                logits, h = self.captured.draft(inputs, self.hidden, hidden_rows, logit_rows)
            # Only a further draft step reads h' (never with one draft token): picked then, from the step's buffer.
            self._draft_hidden, self._draft_pick = None, ((h, logit_rows) if logit_rows else None)
            return logits
        source = self.draft_hidden if hidden_rows is None else self.hidden[self._tensor(hidden_rows)]
        source = source.to(self.model.dtype)
        h = self.model.mtp_hidden_states(self._tensor(inputs.token_ids), source, self._tensor(inputs.positions),
                                         self._context(inputs))
        self._draft_pick = None
        if not logit_rows:
            self._draft_hidden = None
            return None
        self._draft_hidden = h[self._tensor(logit_rows)]
        return self.model.compute_mtp_logits(self._draft_hidden).float()

    @property
    def draft_hidden(self) -> torch.Tensor | None:
        """The last MTP step's normalised h' at its logit rows (valid until the next forward)."""
        if self._draft_pick is not None:
            h, rows = self._draft_pick
            self._draft_hidden, self._draft_pick = h[self._tensor(rows)], None
        return self._draft_hidden
