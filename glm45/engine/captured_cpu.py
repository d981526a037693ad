"""The captured decode step on CPU: the model's forward for a few rows as one precompiled program of C kernels.

Why: a decode step of a small model is hundreds of tiny torch ops (norms, RoPE, routing, SiLU, …), each a few
microseconds of Python and dispatch, and the MoE decode alone forks OpenMP threads dozens of times; on the
2-core machine the bundled model spent most of a step there, and an Air-shaped model about half its time.
CUDA graphs remove that on GPUs; here the same idea is a list of C ops (`csrc/program.c`) built once per row
count and run in one call, inside one OpenMP region with a barrier between ops. torch.compile (inductor's C++
backend) was the other candidate: it still leaves the MoE dispatch and paged attention outside the graph
(data-dependent shapes), and it took minutes to compile per shape on 2 cores.

A program has R rows; row r is one token with its position, KV slot, block table and context length, so a
decode batch, MTP verification (k+1 rows per sequence) and short prefill chunks all fit. Rows are padded up to
the captured size: padding rows write K/V to a scratch block past the cache's blocks and are ignored. Two
programs per size: the trunk (embedding → layers → final norm, keeping the hidden states) and the head
(gathering the rows whose logits are needed → LM head), likewise for the MTP layer, and with an MTP layer a
third: MTP's whole step with one draft token (`cpu_step_programs.build_draft_step`). With `max_steps` > 1, a
program of a whole decode step (trunk, head, and the choice of each row's next token, which becomes its next input)
runs several steps in one call (`decode_steps`, vLLM's multi-step scheduling; MTP's one-program step likewise,
`draft_step_run`): the engine's Python between steps
cost the `small` benchmark model 0.35–0.46 ms a token, a tenth of its step, though it takes 0.05 ms when run
alone: the weights the step streams through the caches evict the interpreter's code and data. The arithmetic is the
eager path's (same kernels for the matrices; bf16 rounding at the same places for bf16 models), so greedy
tokens agree with it (tests/test_captured_cpu.py).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from glm45.engine import cpu_program as ops
from glm45.engine.attention import fill_rows
from glm45.engine.cpu_step_programs import (
    RUN_STOP_IDS,
    StepBuffers,
    build_decode_steps,
    build_draft_step,
    build_draft_steps,
    build_head,
    build_mtp_trunk,
    build_trunk,
)
from glm45.engine.lora import MultiLoRALinear
from glm45.kernels import cpu

logger = logging.getLogger(__name__)

def default_sizes() -> tuple[int, ...]:
    """Row counts captured by default. Measured with 2 threads on 8–64 sequences of 256-token prompts decoding
    together on the Air-shaped 0.6B benchmark model, CPU with AVX512-BF16 (the eager path's MoE running expert by
    expert on torch's bf16 GEMM, the program's head on it too from 8 rows, before the program's bf16 dot products):
    captured 304–307, 365–381, 429–438 and 528–553 tokens/s at 8, 16, 32 and 64 rows against eager 136–137,
    190–191, 250–258 and 371–372. On
    AVX2-only CPUs the eager path's GEMMs widen to fp32, so the program is further ahead there."""
    return (1, 2, 4, 8, 16, 32, 64)


def supported(model, kv_cache: torch.Tensor) -> str | None:
    """Why the captured step cannot run this model here (None when it can)."""
    if cpu.library() is None:
        return "the CPU kernels are not available here"
    if model.device.type != "cpu":
        return "the model is not on the CPU"
    if model.dtype not in (torch.float32, torch.bfloat16):
        return f"the model's dtype is {model.dtype}"
    if kv_cache.dtype not in ops.KV_DTYPES:
        return f"the KV cache's dtype is {kv_cache.dtype}"
    config = model.config
    dims = [config.hidden_size, config.head_dim * config.num_attention_heads, config.moe_intermediate_size,
            config.intermediate_size]
    if any(d % cpu.QBLOCK for d in dims):
        return f"a width of this model is not a multiple of {cpu.QBLOCK}"
    if config.head_dim % 16 or config.head_dim > 128 or config.n_routed_experts > 1024 or config.n_group > 64:
        return "a head dimension (a multiple of 16 up to 128), expert count or group count beyond the kernels' limits"
    return None


class CapturedDecode:
    """The captured programs of one model runner, by size, and the per-step filling of their inputs."""

    def __init__(self, model, kv_cache: torch.Tensor, block_size: int, scratch_block: int, max_model_len: int,
                 sizes=None, max_steps: int = 1):
        start = time.perf_counter()
        self.model, self.kv_cache, self.block_size, self.scratch_block = model, kv_cache, block_size, scratch_block
        self.sizes = sorted(sizes or default_sizes())
        self.threads = torch.get_num_threads()
        self.rounding = model.dtype == torch.bfloat16
        max_blocks = -(-max_model_len // block_size) + 1
        self.max_steps = max_steps
        self.buffers = StepBuffers(model, self.sizes[-1], max_blocks, self.threads, max_steps)
        self.trunks = {n: build_trunk(model, kv_cache, block_size, self.buffers, n) for n in self.sizes}
        self.heads = {n: build_head(model, self.buffers, n, draft=False) for n in self.sizes}
        self.decode_step_programs = {n: build_decode_steps(model, kv_cache, block_size, self.buffers, n)
                                     for n in self.sizes} if max_steps > 1 else {}
        self._step_sampled_last: list[int] = []  # the rows whose decode-step sampling entries are set
        self.mtp_trunks, self.mtp_heads, self.draft_steps, self.draft_step_runs = {}, {}, {}, {}
        if model.mtp is not None:
            self.mtp_trunks = {n: build_mtp_trunk(model, kv_cache, block_size, self.buffers, n) for n in self.sizes}
            self.mtp_heads = {n: build_head(model, self.buffers, n, draft=True) for n in self.sizes}
            self.draft_steps = {n: build_draft_step(model, kv_cache, block_size, self.buffers, n)
                                for n in self.sizes if n >= 2}
            self.draft_step_runs = {n: build_draft_steps(model, kv_cache, block_size, self.buffers, n)
                                    for n in self.sizes if n >= 2} if max_steps > 1 else {}
        self._np = {name: getattr(self.buffers, name).numpy() for name in
                    ("tokens", "positions", "slots", "tables", "context", "source_rows", "logit_rows", "lora_slots",
                     "lora_head_slots", "masked_rows", "run_end", "run", "step_tokens", "step_uniforms",
                     "run_tokens", "run_uniforms")}
        self._uniforms = self.buffers.uniforms.numpy()
        self._views: dict[tuple[str, int], torch.Tensor] = {}
        self._sampled_last: list[int] = []  # the draft step's sequences whose sampling entries are set
        self._masked_last: list[int] = []   # and its rows whose constraint masks are on
        self._identity = np.arange(self.sizes[-1])  # every row's own index: the draft step's logit rows
        self.adapted_layers = sum(isinstance(m, MultiLoRALinear) for m in model.modules())
        logger.info("captured the CPU decode step for %s rows in %.2f s (%d threads)", self.sizes,
                    time.perf_counter() - start, self.threads)

    def size_for(self, rows: int) -> int | None:
        return next((n for n in self.sizes if n >= rows), None)

    def _rows(self, buffer: str, n: int) -> torch.Tensor:
        """The first n rows of a buffer, a view made once (slicing a tensor costs tens of µs in an interpreter whose
        caches a step has just flushed)."""
        view = self._views.get((buffer, n))
        if view is None:
            view = self._views[buffer, n] = getattr(self.buffers, buffer)[:n]
        return view

    def _fill(self, inputs, size: int) -> None:
        fill_rows(self._np, inputs, self.block_size, self.scratch_block, size)

    def _head(self, logit_rows: list[int], draft: bool) -> torch.Tensor:
        """float32 logits of the final (or draft) hidden states' `logit_rows`, in the head program's buffer (valid
        until the next step)."""
        size = self.size_for(len(logit_rows))
        self._logit_rows(logit_rows, size)
        (self.mtp_heads if draft else self.heads)[size].run(self.rounding, self.threads)
        return (self.buffers.draft_logits if draft else self.buffers.logits)[: len(logit_rows)]

    def _logit_rows(self, logit_rows: list[int], size: int) -> None:
        self._np["logit_rows"][: len(logit_rows)] = logit_rows
        self._np["logit_rows"][len(logit_rows):size] = 0

    def serves_adapters_of(self, model) -> bool:
        """Whether the programs include every layer adapters adapt now (a layer is wrapped when the first adapter
        that adapts it is loaded; the runner captures again then)."""
        return self.adapted_layers == sum(isinstance(m, MultiLoRALinear) for m in model.modules())

    def _adapter_slots(self, adapter_ids: list[int] | None, n: int, size: int, logit_rows: list[int]) -> None:
        slots, head, none = self._np["lora_slots"], self._np["lora_head_slots"], self.buffers.no_adapter
        if adapter_ids is None:
            slots[:size] = none
            head[:size] = none
            return
        slots[:n] = adapter_ids
        slots[:n][slots[:n] < 0] = none
        slots[n:size] = none
        head[: len(logit_rows)] = slots[logit_rows]
        head[len(logit_rows):size] = none

    def forward(self, inputs, logit_rows: list[int]) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(float32 logits at `logit_rows`, final hidden states [rows, D]) of the target model; rows with an adapter
        (`inputs.adapter_ids`) add its LoRA deltas."""
        n = len(inputs.token_ids)
        size = self.size_for(n)
        self._fill(inputs, size)
        self._adapter_slots(inputs.adapter_ids, n, size, logit_rows)
        self.trunks[size].run(self.rounding, self.threads)
        hidden = self.buffers.hidden[:n]
        if not logit_rows:
            return None, hidden
        return self._head(logit_rows, draft=False), hidden

    def decode_steps(self, inputs, steps: int, sampled: dict[int, tuple[tuple, list[float]]],
                     until: list[tuple[list[int], int]]) -> tuple[list[list[int]], torch.Tensor]:
        """Up to `steps` ≤ `max_steps` decode steps of one token per row in one call (`build_decode_steps`); each row's
        block table must hold the blocks of the positions the steps reach. `sampled`: {row: (its `cpu.SampleRow`
        fields, its `steps` uniforms)}; the other rows are greedy. `until`: per row, its stop ids and how many tokens
        it may still take; the run ends once every row has taken a stop id or its last token. → (each row's tokens,
        one per step run; the last step's final hidden states [rows, D])."""
        n = len(inputs.token_ids)
        size = self.size_for(n)
        self._fill(inputs, size)
        tables, block_size = self._np["tables"], self.block_size
        for s in inputs.slices:  # fill_rows wrote the blocks up to this step's position; the later steps' as well
            table = s.block_table[: -(-(s.ctx_len + steps - 1) // block_size)]
            tables[s.q_start, : len(table)] = table
        self._adapter_slots(None, n, size, [])
        self._np["logit_rows"][:size] = self._identity[:size]
        b = self.buffers
        for r in self._step_sampled_last:
            b.step_rows[r].inv_temperature = 0.0
        self._step_sampled_last = list(sampled)
        for r, (row, uniforms) in sampled.items():
            b.step_rows[r] = cpu.SampleRow(*row)
            self._np["step_uniforms"][:steps, r] = uniforms
        self._np["run"][1] = n
        self._until(until)
        ran = self.decode_step_programs[size].run_steps(steps, b.run, b.run_end, self.rounding, self.threads)
        return self._np["step_tokens"][:ran, :n].T.tolist(), self._rows("hidden", n)

    def _until(self, until: list[tuple[list[int], int]]) -> None:
        """The end of a run's rows (MTP: sequences): their stop ids (only when all fit), budgets, none done."""
        end = self._np["run_end"]
        end[: len(until)] = -1
        for i, (stop_ids, budget) in enumerate(until):
            if len(stop_ids) <= RUN_STOP_IDS:
                end[i, : len(stop_ids)] = stop_ids
            end[i, RUN_STOP_IDS:] = budget, 0

    def draft_step(self, inputs, sampled: dict[int, tuple[tuple, list[float], torch.Tensor]],
                   token_masks: dict[int, torch.Tensor] | None = None
                   ) -> tuple[list[int], list[bool], list[int], torch.Tensor, torch.Tensor, torch.Tensor]:
        """`build_draft_step` over `inputs` (rows [x_n, d] per sequence). `sampled`: {sequence index: (its
        `cpu.SampleRow` fields, its 5 uniforms, the distribution its draft was drawn from [V])}; the others are
        greedy. `token_masks`: {row: the bitmask [⌈V/32⌉] of a constraint on that row's token}. → (each row's token,
        whether each sequence's draft was accepted, each row's next draft (sampled sequences: at the row the next step
        extends), the sampled sequences' next draft distributions [sequences, V], the rows' draft logits [rows, V]
        (buffers valid until the next step), the final hidden states [rows, D])."""
        n, size = self._draft_inputs(inputs, sampled, token_masks)
        b = self.buffers
        self.draft_steps[size].run(self.rounding, self.threads)
        return (b.next_tokens[:n].tolist(), [bool(a) for a in b.accepted[: n // 2].tolist()],
                b.draft_tokens[:n].tolist(), self._rows("q_out", n // 2), self._rows("draft_logits", n),
                self._rows("hidden", n))

    def draft_step_run(self, inputs, steps: int, sampled: dict[int, tuple[tuple, list[float], torch.Tensor]],
                       until: list[tuple[list[int], int]]
                       ) -> tuple[list[list[list[int]]], list[int], torch.Tensor, torch.Tensor]:
        """Up to `steps` ≤ `max_steps` MTP steps in one call (`build_draft_steps`; no constraints), from `inputs` as
        `draft_step` takes them; each row's block table must hold the blocks of the positions the steps reach.
        `sampled`: {sequence index: (its `cpu.SampleRow` fields, its 5 uniforms for each step, the distribution its
        draft was drawn from)}. `until`: as `decode_steps` takes it, per sequence. → (each sequence's tokens per step
        run (1 or 2), each sequence's next draft, the sampled sequences' next draft distributions [sequences, V], the
        last step's final hidden states)."""
        first = {s: (row, uniforms[:5], q) for s, (row, uniforms, q) in sampled.items()}
        n, size = self._draft_inputs(inputs, first, None)
        b = self.buffers
        tables, block_size = self._np["tables"], self.block_size
        for s in inputs.slices:  # the blocks of the positions the later steps reach (rows [x_n, d] advance by 1 or 2)
            table = s.block_table[: -(-(s.ctx_len + 2 * (steps - 1)) // block_size)]
            tables[s.q_start: s.q_start + s.q_len, : len(table)] = table
        for s, (_, uniforms, _) in sampled.items():
            self._np["run_uniforms"][1:steps, s] = np.reshape(uniforms[5:], (steps - 1, 5))
        self._np["run"][1] = n // 2
        self._until(until)
        ran = self.draft_step_runs[size].run_steps(steps, b.run, b.run_end, self.rounding, self.threads)
        taken = self._np["run_tokens"][:ran, : n // 2].transpose(1, 0, 2).tolist()
        per_step = [[[t for t in pair if t >= 0] for pair in seq_steps] for seq_steps in taken]
        drafts = self._np["tokens"][1:n:2].tolist()  # each sequence's next draft, in its row for the step after the run
        return per_step, drafts, self._rows("q_in", n // 2), self._rows("hidden", n)

    def _draft_inputs(self, inputs, sampled: dict, token_masks: dict | None) -> tuple[int, int]:
        """The draft step's inputs: rows, logit and source rows, sampling entries and masks. → (rows, size)."""
        n = len(inputs.token_ids)
        size = self.size_for(n)
        self._fill(inputs, size)
        self._adapter_slots(None, n, size, [])
        self._np["logit_rows"][:size] = self._np["source_rows"][:size] = self._identity[:size]
        b = self.buffers
        for s in self._sampled_last:  # back to greedy (inverse temperature 0): the entries the last step set
            b.sample_rows[s].inv_temperature = 0.0
        self._sampled_last = list(sampled)
        for s, (row, uniforms, q) in sampled.items():
            b.sample_rows[s] = cpu.SampleRow(*row)
            self._uniforms[s] = uniforms
            b.q_in[s].copy_(q)
        if self._masked_last or token_masks:  # back to unmasked: the rows the last step masked
            masked = self._np["masked_rows"]
            masked[self._masked_last] = 0
            self._masked_last = list(token_masks or ())
            for r, bitmask in (token_masks or {}).items():
                b.token_masks[r].copy_(bitmask)
                masked[r] = 1
        return n, size

    def draft(self, inputs, hidden: torch.Tensor, hidden_rows: list[int] | None,
              logit_rows: list[int]) -> tuple[torch.Tensor | None, torch.Tensor]:
        """One MTP step: (float32 logits at `logit_rows`, normalised h' [rows, D]). Row r pairs with the hidden
        state `hidden[hidden_rows[r]]` (or `hidden[r]` when `hidden_rows` is None). When `hidden` is the
        captured target's own buffer the program gathers the rows itself; otherwise they are copied in first."""
        n = len(inputs.token_ids)
        size = self.size_for(n)
        self._fill(inputs, size)
        rows = self._np["source_rows"]
        if hidden_rows is not None and hidden.data_ptr() == self.buffers.hidden.data_ptr():
            rows[:n] = hidden_rows
        else:
            picked = hidden if hidden_rows is None else hidden[torch.tensor(hidden_rows)]
            self.buffers.hidden[:n] = picked
            rows[:n] = np.arange(n)
        rows[n:size] = 0
        self.mtp_trunks[size].run(self.rounding, self.threads)
        h = self.buffers.draft_hidden[:n]
        if not logit_rows:
            return None, h
        return self._head(logit_rows, draft=True), h
