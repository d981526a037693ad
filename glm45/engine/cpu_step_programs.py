"""The programs of the captured CPU decode step: the buffers they share (`StepBuffers`), the ops of a decoder block,
the MoE, the embedding and the heads (`_Builder`), and the programs a step runs, one per row count: the trunk, the
head, the MTP layer's trunk and head, MTP's whole step with one draft token (`build_draft_step`), and the steps that
run several in one call (`build_decode_steps`, `build_draft_steps`). `captured_cpu.py` builds them for a model and
runs them."""

from __future__ import annotations

import ctypes

import torch

from glm45.engine import cpu_program as ops
from glm45.engine.cpu_program import Program, as_f32, describe, linear_weight
from glm45.engine.lora import MultiLoRALinear
from glm45.grammar import masks
from glm45.kernels import cpu

RUN_STOP_IDS = 8  # stop ids a run checks per row (csrc/program.c); a row with more is done by its budget only


class StepBuffers:
    """Inputs, activations and outputs of the captured programs, allocated once for the largest size."""

    def __init__(self, model, rows: int, max_blocks: int, threads: int, max_steps: int = 1):
        c = model.config
        D, hd, K = c.hidden_size, c.head_dim, c.num_experts_per_tok
        width = max(c.intermediate_size, c.moe_intermediate_size * max(1, c.n_shared_experts))
        f32 = dict(dtype=torch.float32)
        self.rows, self.max_blocks = rows, max_blocks
        self.tokens = torch.zeros(rows, dtype=torch.int64)
        self.positions = torch.zeros(rows, dtype=torch.int64)
        self.slots = torch.zeros(rows, dtype=torch.int64)
        self.tables = torch.zeros(rows, max_blocks, dtype=torch.int32)
        self.context = torch.ones(rows, dtype=torch.int32)
        self.source_rows = torch.zeros(rows, dtype=torch.int64)
        self.logit_rows = torch.zeros(rows, dtype=torch.int64)
        self.next_tokens = torch.zeros(rows, dtype=torch.int64)   # the draft step's tokens (targets, drafts)
        self.draft_tokens = torch.zeros(rows, dtype=torch.int64)
        # The draft step's sampling (one entry per sequence, rows [x_n, d]): each one's parameters (`SampleRow`; 0
        # inverse temperature: greedy), uniforms, whether its draft was accepted, the draft distributions it verifies
        # against and the next ones; the rows' target distributions, and per-thread sampling scratch.
        seqs, vocab = rows // 2 + 1, c.vocab_size if model.mtp is not None else 0
        self.sample_params = torch.zeros(seqs * ctypes.sizeof(cpu.SampleRow), dtype=torch.uint8)
        self.sample_rows = (cpu.SampleRow * seqs).from_address(self.sample_params.data_ptr())
        self.uniforms = torch.zeros(seqs, 5, **f32)
        self.accepted = torch.zeros(seqs, dtype=torch.int64)
        self.q_in, self.q_out = torch.empty(seqs, vocab, **f32), torch.empty(seqs, vocab, **f32)
        self.verify_probs = torch.empty(rows if vocab else 0, vocab, **f32)
        sampled_vocab = c.vocab_size if model.mtp is not None or max_steps > 1 else 0
        self.sample_scratch = torch.empty(threads, cpu.SAMPLE_SCRATCH * sampled_vocab, **f32)
        # Decode steps run several in one call (`build_decode_steps`): each row's sampling (`SampleRow`; 0 inverse
        # temperature: greedy), its uniform for each step, the step's index, how many rows are live, and the tokens
        # each step took.
        self.step_params = torch.zeros(rows * ctypes.sizeof(cpu.SampleRow), dtype=torch.uint8)
        self.step_rows = (cpu.SampleRow * rows).from_address(self.step_params.data_ptr())
        self.step_uniforms = torch.zeros(max_steps, rows, **f32)
        self.run = torch.zeros(2, dtype=torch.int64)  # a run's step index and live rows (MTP: sequences)
        self.step_tokens = torch.zeros(max_steps, rows, dtype=torch.int64)
        # MTP steps run several in one call (`build_draft_steps`): each sequence's uniforms for every step after the
        # first, and the tokens each step took (the target's t_n, and t_d when the draft was accepted, else -1).
        self.run_uniforms = torch.zeros(max_steps + 1, seqs, 5, **f32) if vocab else torch.zeros(0)
        self.run_tokens = torch.zeros(max_steps, seqs, 2, dtype=torch.int64)
        # When a run's rows (MTP: sequences) are done, per row: its stop ids (-1: none), the tokens it may still
        # take, and whether it is done (a run ends once all of them are).
        self.run_end = torch.zeros(rows, RUN_STOP_IDS + 2, dtype=torch.int64)
        # Constraint masks of the draft step's target rows (xgrammar's bitmask layout), applied where `masked_rows`.
        self.token_masks = torch.full((rows if vocab else 0, masks.words(vocab)), -1, dtype=torch.int32)
        self.masked_rows = torch.zeros(rows, dtype=torch.int64)
        self.x, self.h, self.delta = (torch.zeros(rows, D, **f32) for _ in range(3))
        self.qkv = torch.zeros(rows, (c.num_attention_heads + 2 * c.num_key_value_heads) * hd, **f32)
        self.attn = torch.zeros(rows, c.num_attention_heads * hd, **f32)
        self.gate_up, self.act = torch.zeros(rows, 2 * width, **f32), torch.zeros(rows, width, **f32)
        self.expert_gate_up = torch.zeros(rows * K, 2 * c.moe_intermediate_size, **f32)
        self.expert_act = torch.zeros(rows * K, c.moe_intermediate_size, **f32)
        self.expert_out = torch.zeros(rows * K, D, **f32)
        self.shared_out = torch.zeros(rows, D, **f32)
        self.ids = torch.zeros(rows, K, dtype=torch.int64)
        self.weights = torch.zeros(rows, K, **f32)
        self.hidden = torch.zeros(rows, D, **f32)         # the target's final hidden states
        self.draft_hidden = torch.zeros(rows, D, **f32)   # the MTP layer's normalised h'
        self.concat = torch.zeros(rows, 2 * D, **f32)
        self.source = torch.zeros(rows, D, **f32)
        self.head_in = torch.zeros(rows, D, **f32)
        # Logit rows are only read after the head wrote them, so they are left unwritten: their pages become
        # resident as steps of that many rows run (64 rows of a 151k vocabulary are 37 MiB, which a one-user
        # server never touches). A vocabulary-wide row is 0.6 MB: the draft head's rows exist only with MTP.
        self.logits = torch.empty(rows, c.vocab_size, **f32)
        self.draft_logits = torch.empty(rows if model.mtp is not None else 0, c.vocab_size, **f32)
        # The decode attention's scratch per thread (csrc/program.c, op_attn: a tile of keys and values, and the
        # scores and accumulators of the queries of a few rows of one sequence).
        group = c.num_attention_heads // c.num_key_value_heads
        self.attention_scratch = torch.zeros(threads, cpu.library().glm45_attention_scratch(hd, group), **f32)
        self.inv_freq = as_f32(model.rotary.inv_freq(torch.device("cpu")))
        self.rope_table = torch.zeros(rows, c.rotary_dim, **f32)  # each row's cos and sin, filled per program
        # Served LoRA adapters: each row's slot (the zero slot `no_adapter` for base rows), the head rows' slots,
        # and the rank-wide intermediate t = A · x.
        adapted = [m for m in model.modules() if isinstance(m, MultiLoRALinear)]
        self.no_adapter = adapted[0].lora_A.shape[0] - 1 if adapted else 0
        self.lora_slots = torch.full((rows,), self.no_adapter, dtype=torch.int64)
        self.lora_head_slots = torch.full((rows,), self.no_adapter, dtype=torch.int64)
        self.lora_t = torch.zeros(rows, max((m.lora_A.shape[1] for m in adapted), default=1), **f32)
        self.lora_delta = torch.zeros(rows, max((m.lora_Bt.shape[2] for m in adapted), default=1), **f32)
        self._quant: dict[tuple, tuple] = {}

    def quant(self, buffer: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scratch for an activation buffer's int8 form (one per buffer, shared by all sizes)."""
        key = (buffer.data_ptr(),)
        if key not in self._quant:
            width = buffer.shape[1]
            self._quant[key] = (torch.zeros(buffer.shape[0], width, dtype=torch.int8),
                                torch.zeros(buffer.shape[0], width // cpu.QBLOCK),
                                torch.zeros(buffer.shape[0], width // cpu.QBLOCK))
        return self._quant[key]


class _Builder:
    """Emits the ops of one program for `rows` rows over shared buffers."""

    def __init__(self, model, kv_cache: torch.Tensor, block_size: int, buffers: StepBuffers, rows: int):
        self.model, self.config, self.kv_cache, self.block_size = model, model.config, kv_cache, block_size
        self.b, self.rows = buffers, rows
        self.program = Program()
        self.rope_table_filled = False
        self.lora_slots = buffers.lora_slots  # the head's program reads its rows' slots from lora_head_slots

    # -------------------------------------------------------------- pieces
    def quantize_if_needed(self, buffer: torch.Tensor, rows: int, weights: list) -> tuple:
        """An int8 copy of `buffer`'s rows for weights that take integer dots (int8, int4)."""
        if not any(getattr(w, "format", None) in ("int8", "int4") for w in weights):
            return (None, None, None)
        xq, xd, xs = self.b.quant(buffer, rows)
        self.program.add(ops.OP_QUANT, (buffer, xq, xd, xs), (rows, buffer.shape[1], buffer.shape[1]))
        return xq, xd, xs

    def linear(self, x: torch.Tensor, rows: int, outputs: list[tuple]) -> None:
        """outputs: [(module or (weight, bias), out tensor view start, out row stride)]."""
        weights = [(linear_weight(m) if not isinstance(m, tuple) else m) for m, _, _ in outputs]
        quant = self.quantize_if_needed(x, rows, [w for w, _ in weights])
        pointers, strides = [x, *quant], [rows, x.shape[1], len(outputs), 0, 0, 0, x.shape[1]]
        for j, ((weight, bias), (_, out, ld)) in enumerate(zip(weights, outputs, strict=True)):
            pointers += [describe(self.program, weight, bias), out]
            strides[3 + j] = ld
        self.program.add(ops.OP_LINEAR, pointers, strides)
        adapted = [(module, out, ld) for module, out, ld in outputs if isinstance(module, MultiLoRALinear)]
        if adapted:  # layers served adapters adapt (engine/lora.MultiLoRALinear)
            self.lora(x, rows, adapted)

    def lora(self, x: torch.Tensor, rows: int, outputs: list[tuple]) -> None:
        """out[r] += B[slot r] · (A[slot r] · x[r]) for rows with an adapter, for each (module, out, ld) of one
        product. The factors are read where the module holds them (B transposed), so an adapter loaded into a slot
        later needs no rebuild."""
        b = self.b
        _, rank, k = outputs[0][0].lora_A.shape
        pointers = [x, self.lora_slots, b.lora_t, b.lora_delta]
        numbers = [rows, k, rank, x.shape[1], b.no_adapter, len(outputs), b.lora_delta.shape[1]]
        for module, out, ld in outputs:
            pointers += [module.lora_A, module.lora_Bt, out]
            numbers += [module.lora_Bt.shape[2], ld]
        self.program.add(ops.OP_LORA, pointers, numbers)

    def norm(self, x: torch.Tensor, weight, out: torch.Tensor, add: torch.Tensor | None = None) -> None:
        D = weight.numel()
        self.program.add(ops.OP_RMSNORM, (x, as_f32(weight), out, add),
                         (self.rows, D, x.shape[1], out.stride(0), 0 if add is None else add.shape[1]),
                         (self.config.rms_norm_eps,))

    def block(self, layer, cache_index: int, input_delta: torch.Tensor | None) -> None:
        """One decoder block; the residual add of the previous block's output is fused into the first norm."""
        b, c, R = self.b, self.config, self.rows
        attn = layer.self_attn
        hd, Hq, Hkv = c.head_dim, attn.num_heads, attn.num_kv_heads
        self.norm(b.x, layer.input_layernorm.weight, b.h, input_delta)
        q_width, kv_width = Hq * hd, Hkv * hd
        ld = b.qkv.shape[1]
        self.linear(b.h, R, [(attn.q_proj, b.qkv, ld), (attn.k_proj, b.qkv[:, q_width:], ld),
                             (attn.v_proj, b.qkv[:, q_width + kv_width:], ld)])
        k_cache, v_cache = self.kv_cache[cache_index, 0], self.kv_cache[cache_index, 1]
        qn = as_f32(attn.q_norm.weight) if attn.use_qk_norm else None
        kn = as_f32(attn.k_norm.weight) if attn.use_qk_norm else None
        kv_dtype = ops.KV_DTYPES[self.kv_cache.dtype]
        # the program's first QK_ROPE fills the cos/sin table of the rows' positions; later layers read it
        self.program.add(ops.OP_QK_ROPE, (b.qkv, qn, kn, b.positions, k_cache, v_cache, b.slots, b.inv_freq,
                                          b.rope_table),
                         (R, Hq, Hkv, hd, c.rotary_dim, ld, kv_dtype, int(not self.rope_table_filled)),
                         (c.rms_norm_eps,))
        self.rope_table_filled = True
        self.program.add(ops.OP_ATTN, (b.qkv, k_cache, v_cache, b.tables, b.context, b.attn, b.attention_scratch),
                         (R, Hq, Hkv, hd, self.block_size, b.max_blocks, ld, b.attn.shape[1], kv_dtype,
                          b.attention_scratch.shape[1]), (attn.scale,))
        self.linear(b.attn, R, [(attn.o_proj, b.delta, b.delta.shape[1])])
        self.norm(b.x, layer.post_attention_layernorm.weight, b.h, b.delta)
        if hasattr(layer.mlp, "gate"):
            self.moe(layer.mlp)
        else:
            self.mlp(layer.mlp, b.delta)

    def mlp(self, mlp, out: torch.Tensor) -> None:
        """gate/up → SiLU(gate)·up → down. The buffers are as wide as the widest MLP; narrower ones use their
        first columns (the kernels take row strides)."""
        b, R = self.b, self.rows
        width = linear_weight(mlp.gate_proj)[0].shape[-2]
        ld = b.gate_up.shape[1]
        self.linear(b.h, R, [(mlp.gate_proj, b.gate_up, ld), (mlp.up_proj, b.gate_up[:, width:], ld)])
        self.program.add(ops.OP_SILU_MUL, (b.gate_up, b.act), (R, width, ld, b.act.shape[1]))
        self.linear(b.act, R, [(mlp.down_proj, out, out.shape[1])])

    def moe(self, moe) -> None:
        b, c, R = self.b, self.config, self.rows
        K, I = c.num_experts_per_tok, c.moe_intermediate_size
        router = moe.gate
        self.program.add(ops.OP_ROUTER, (b.h, as_f32(router.weight), as_f32(router.e_score_correction_bias), b.ids,
                                     b.weights),
                         (R, c.hidden_size, c.n_routed_experts, K, c.n_group, c.topk_group, int(c.norm_topk_prob),
                          b.h.shape[1]), (c.routed_scaling_factor,))
        gate_up, down = moe.experts.weights()
        quant = self.quantize_if_needed(b.h, R, [gate_up])
        self.program.add(ops.OP_GROUPED, (b.h, *quant, describe(self.program, gate_up), b.ids, b.expert_gate_up),
                         (R * K, K, b.h.shape[1], b.expert_gate_up.shape[1], b.h.shape[1]))
        self.program.add(ops.OP_SILU_MUL, (b.expert_gate_up, b.expert_act), (R * K, I, 2 * I, I))
        quant = self.quantize_if_needed(b.expert_act, R * K, [down])
        self.program.add(ops.OP_GROUPED, (b.expert_act, *quant, describe(self.program, down), b.ids, b.expert_out),
                         (R * K, 1, I, b.expert_out.shape[1], I))
        self.mlp(moe.shared_experts, b.shared_out)
        self.program.add(ops.OP_COMBINE, (b.expert_out, b.weights, b.shared_out, b.delta),
                         (R, K, c.hidden_size, b.delta.shape[1]))

    def embed(self, embedding, out: torch.Tensor, tokens: torch.Tensor | None = None) -> None:
        weight = getattr(embedding, "packed", None)
        weight = weight if weight is not None else embedding.weight
        tokens = self.b.tokens if tokens is None else tokens
        self.program.add(ops.OP_EMBED, (describe(self.program, weight), tokens, out), (self.rows, out.shape[1]))

    def head(self, source: torch.Tensor, head_module, logits: torch.Tensor) -> None:
        b = self.b
        self.program.add(ops.OP_GATHER, (source, b.logit_rows, b.head_in), (self.rows, source.shape[1], source.shape[1],
                                                                       b.head_in.shape[1]))
        self.linear(b.head_in, self.rows, [(head_module, logits, logits.shape[1])])


def emit_trunk(builder: _Builder) -> None:
    """The target model: tokens → final hidden states (`buffers.hidden`)."""
    model, b = builder.model, builder.b
    builder.embed(model.model.embed_tokens, b.x)
    delta = None
    for index, layer in enumerate(model.model.layers):
        builder.block(layer, index, delta)
        delta = b.delta
    builder.norm(b.x, model.model.norm.weight, b.hidden, delta)


def emit_mtp_trunk(builder: _Builder, tokens: torch.Tensor) -> None:
    """x = eh_proj([enorm(embed(token)), hnorm(h)]) → the MTP block → h' = shared_head.norm(x), the tokens read from
    `tokens`; the rows of h are gathered from `buffers.hidden` (the target's last hidden states) by
    `buffers.source_rows`."""
    model, b, rows = builder.model, builder.b, builder.rows
    mtp, D = model.mtp, model.config.hidden_size
    builder.embed(mtp.embed_tokens, b.x, tokens)
    builder.program.add(ops.OP_GATHER, (b.hidden, b.source_rows, b.source), (rows, D, D, D))
    builder.norm(b.x, mtp.enorm.weight, b.concat)
    builder.norm(b.source, mtp.hnorm.weight, b.concat[:, D:])
    builder.linear(b.concat, rows, [(mtp.eh_proj, b.x, D)])
    builder.block(mtp, model.config.num_hidden_layers, None)
    builder.norm(b.x, mtp.shared_head.norm.weight, b.draft_hidden, b.delta)


def emit_head(builder: _Builder, draft: bool) -> None:
    """Logits of the rows `buffers.logit_rows` of the final (or, for `draft`, the MTP layer's) hidden states."""
    model, b = builder.model, builder.b
    slots, builder.lora_slots = builder.lora_slots, b.lora_head_slots
    if draft:
        builder.head(b.draft_hidden, model.mtp.shared_head.head, b.draft_logits)
    else:
        builder.head(b.hidden, model.lm_head, b.logits)
    builder.lora_slots = slots


def build_trunk(model, kv_cache, block_size, buffers: StepBuffers, rows: int) -> Program:
    builder = _Builder(model, kv_cache, block_size, buffers, rows)
    emit_trunk(builder)
    builder.program.finish()
    return builder.program


def build_mtp_trunk(model, kv_cache, block_size, buffers: StepBuffers, rows: int) -> Program:
    builder = _Builder(model, kv_cache, block_size, buffers, rows)
    emit_mtp_trunk(builder, buffers.tokens)
    builder.program.finish()
    return builder.program


def build_head(model, buffers: StepBuffers, rows: int, draft: bool) -> Program:
    builder = _Builder(model, None, 0, buffers, rows)
    emit_head(builder, draft)
    builder.program.finish()
    return builder.program


def build_decode_steps(model, kv_cache, block_size, buffers: StepBuffers, rows: int) -> Program:
    """One decode step for a run of several in one call (`Program.run_steps`): the trunk and the head over the rows
    (logit rows: every row), then `OP_ADVANCE`: each live row takes its next token (the argmax, or a draw with the
    step's uniform; `buffers.step_rows`, `step_uniforms`) into `step_tokens[step]`, and that token at the next
    position is the row's input to the next step. The rows' block tables must reach the last step's position."""
    b = buffers
    builder = _Builder(model, kv_cache, block_size, buffers, rows)
    emit_trunk(builder)
    emit_head(builder, draft=False)
    builder.program.add(ops.OP_ADVANCE, (b.logits, b.step_params, b.step_uniforms, b.run,
                                         b.tokens, b.positions, b.slots, b.tables, b.context, b.step_tokens,
                                         b.sample_scratch, b.run_end),
                        (b.rows, model.config.vocab_size, b.logits.shape[1], block_size, b.max_blocks,
                         b.sample_scratch.shape[1]))
    builder.program.finish()
    return builder.program


def build_draft_steps(model, kv_cache, block_size, buffers: StepBuffers, rows: int) -> Program:
    """One MTP step for a run of several in one call (`Program.run_steps`): `build_draft_step`'s ops, then
    `OP_ADVANCE_DRAFT`: each live sequence records the tokens the step took (`run_tokens[step]`) and goes on from
    the pair the next step extends, its pending token and the draft made for it in the rows' inputs (and, sampled,
    that draft's distribution and the next step's uniforms, `run_uniforms[step + 1]`). The rows' block tables must
    reach the last step's positions."""
    b = buffers
    program = build_draft_step(model, kv_cache, block_size, buffers, rows, finish=False)
    program.add(ops.OP_ADVANCE_DRAFT, (b.next_tokens, b.accepted, b.draft_tokens, b.sample_params, b.q_out, b.q_in,
                                       b.uniforms, b.run_uniforms, b.run, b.tokens, b.positions,
                                       b.slots, b.tables, b.context, b.run_tokens, b.run_end),
                (b.uniforms.shape[0], model.config.vocab_size, b.q_in.shape[1], block_size, b.max_blocks))
    program.finish()
    return program


def build_draft_step(model, kv_cache, block_size, buffers: StepBuffers, rows: int, finish: bool = True) -> Program:
    """Verification and the next draft of MTP with one draft token, in one program (logit and source rows: every
    row). Rows come in pairs [x_n, d] per sequence, at positions n and n + 1:

        target over the rows → logits → a constraint's mask on the rows that have one (`OP_MASK`) → verification
            (`OP_VERIFY`): each row's token t (`buffers.next_tokens`) and whether d was accepted (`accepted`);
            greedy t is the argmax, sampled t the rejection sampler's
        MTP over the pairs (h_r, t_r), at the rows' positions → draft logits → the next drafts (`OP_DRAFT`,
            `draft_tokens`): greedy, every row's argmax; sampled, at the row of the pair the next step extends, a
            draw from the draft distribution (`q_out`)

    Either way the pairs the next step needs were computed: accepted, both (h_n, d = t_n) and (h_d, t_d), whose
    draft is the next one; rejected, (h_n, t_n), whose draft is the next one. These are the pairs
    `Executor.propose_drafts` would run. A rejected draft's pair writes MTP K/V at position n + 1, which the next
    step writes again before any row reads it."""
    b = buffers
    builder = _Builder(model, kv_cache, block_size, buffers, rows)
    vocab = model.config.vocab_size
    emit_trunk(builder)
    emit_head(builder, draft=False)
    builder.program.add(ops.OP_MASK, (b.logits, b.token_masks, b.masked_rows),
                        (rows, vocab, b.logits.shape[1], b.token_masks.shape[1]))
    builder.program.add(ops.OP_VERIFY, (b.logits, b.tokens, b.q_in, b.sample_params, b.uniforms, b.next_tokens,
                                        b.accepted, b.verify_probs, b.sample_scratch),
                        (rows, vocab, b.logits.shape[1], b.q_in.shape[1], b.verify_probs.shape[1],
                         b.sample_scratch.shape[1]))
    emit_mtp_trunk(builder, b.next_tokens)
    emit_head(builder, draft=True)
    builder.program.add(ops.OP_DRAFT, (b.draft_logits, b.sample_params, b.uniforms, b.accepted, b.draft_tokens,
                                       b.q_out, b.sample_scratch),
                        (rows, vocab, b.draft_logits.shape[1], b.q_out.shape[1], b.sample_scratch.shape[1]))
    if finish:
        builder.program.finish()
    return builder.program
