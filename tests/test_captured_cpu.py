"""The captured CPU decode step against the eager path: same logits within float tolerance (teacher-forced, so
a near-tie cannot send the two down different continuations), same argmax wherever the margin is clear, for
tiny configurations (QK-norm and dense layers, grouped routing, one KV head), fp32 and bf16, every weight
format, batched rows, MTP verification rows and MTP drafting; and identical greedy text end to end."""

import pytest
import torch
from tiny_checkpoints import AIR_LIKE, TINY_CONFIGS, save_mtp_model, save_reference

from glm45 import LLM, SamplingParams
from glm45.engine.attention import SeqSlice
from glm45.engine.model_runner import ModelRunner, StepInputs
from glm45.grammar import StructuredOutputsParams
from glm45.kernels import cpu
from glm45.model import Glm4MoeForCausalLM

pytestmark = pytest.mark.skipif(cpu.library() is None, reason="the CPU kernels cannot run here (no AVX2 or compiler)")
BLOCK = 16


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from transformers import Glm4MoeConfig
    from transformers import Glm4MoeForCausalLM as Reference

    out = {kind: save_reference(kind, tmp_path_factory.mktemp(kind)) for kind in TINY_CONFIGS}
    torch.manual_seed(1)
    one_kv = Reference(Glm4MoeConfig(**{**AIR_LIKE, "num_key_value_heads": 1})).eval()
    with torch.no_grad():
        for param in one_kv.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.08)
    out["one_kv_head"] = tmp_path_factory.mktemp("one_kv_head")
    one_kv.save_pretrained(out["one_kv_head"])
    out["mtp"] = save_mtp_model(tmp_path_factory.mktemp("mtp"), attention_scale=0.5)
    return out


class Session:
    """Sequences on one model runner, fed by hand: a prefill, then decode rows (one per sequence, or k+1)."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.tables = {}

    def inputs(self, rows: list[tuple[int, int, int]]) -> StepInputs:
        """rows: (sequence, token, position), grouped by sequence, positions consecutive per sequence."""
        ids, positions, slots, slices = [], [], [], []
        for seq in dict.fromkeys(r[0] for r in rows):
            mine = [r for r in rows if r[0] == seq]
            table = self.tables.setdefault(seq, [seq * 8 + i for i in range(8)])
            last = mine[-1][2]
            slices.append(SeqSlice(len(ids), len(mine), last + 1, table))
            for _, token, position in mine:
                ids.append(token)
                positions.append(position)
                slots.append(table[position // BLOCK] * BLOCK + position % BLOCK)
        return StepInputs(ids, positions, slots, slices)


def new_runner(model, kv_cache_dtype="auto") -> ModelRunner:
    layers = model.config.num_hidden_layers + (1 if model.mtp is not None else 0)
    return ModelRunner.create(model, 32, layers, BLOCK, kv_cache_dtype)


def load(folder, dtype, quantization=None, lm_head_quantization=None):
    return Glm4MoeForCausalLM.from_pretrained(folder, dtype=dtype, progress=False, quantization=quantization,
                                              lm_head_quantization=lm_head_quantization)


def runners(folder, dtype, quantization=None, kv_cache_dtype="auto", lm_head_quantization=None):
    model = load(folder, dtype, quantization, lm_head_quantization)
    eager, captured = new_runner(model, kv_cache_dtype), new_runner(model, kv_cache_dtype)
    captured.capture(max_model_len=120, sizes=[1, 2, 4, 8])
    assert captured.captured is not None
    return Session(eager), Session(captured)


def exact_session(folder, quantization=None, lm_head_quantization=None) -> Session:
    """The eager path in fp32 on the same (quantized) weights: what bf16 runs are judged against."""
    return Session(new_runner(load(folder, torch.float32, quantization, lm_head_quantization)))


class Agreement:
    """Logits of the two paths, step by step. fp32 (`strict`): every step's largest difference ≤ 1e-4 of the
    largest logit and the same argmax wherever the top-two margin is clear. bf16: the two paths round at
    different places (torch's SDPA and the captured attention differ by an ulp in about a third of their
    outputs; the quantized kernels round activations where torch's ops do not), and in these small random
    models with large weights an ulp can flip an expert choice, so how far apart the two bf16 paths land
    depends on the CPU's instruction set. bf16 is therefore judged against the exact result, the eager path
    in fp32 on the same weights: over all steps the captured path's median distance from it (mean difference
    over mean logit) is at most 1.2× the eager path's, and the two give the same argmax in ≥ 85% of the rows."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.eager_errors: list[float] = []
        self.captured_errors: list[float] = []
        self.rows = self.agreeing = 0

    def add(self, a: torch.Tensor, b: torch.Tensor, exact: torch.Tensor | None = None) -> None:
        scale = a.abs().max()
        if self.strict:
            assert (a - b).abs().max() <= 1e-4 * scale, float((a - b).abs().max() / scale)
            top2 = a.topk(2, dim=-1).values
            clear = (top2[:, 0] - top2[:, 1]) > 2e-4 * scale
            assert torch.equal(a.argmax(-1)[clear], b.argmax(-1)[clear])
        else:
            assert exact is not None, "bf16 is judged against the exact (fp32) result"
            magnitude = exact.abs().mean()
            self.eager_errors.append(float((a.float() - exact).abs().mean() / magnitude))
            self.captured_errors.append(float((b.float() - exact).abs().mean() / magnitude))
        self.rows += a.shape[0]
        self.agreeing += int((a.argmax(-1) == b.argmax(-1)).sum())

    def check(self) -> None:
        if not self.strict:
            eager, captured = (sorted(e)[len(e) // 2] for e in (self.eager_errors, self.captured_errors))
            assert captured <= 1.2 * eager, (captured, eager, self.captured_errors, self.eager_errors)
            assert self.agreeing >= 0.85 * self.rows, (self.agreeing, self.rows)


def run_teacher_forced(eager: Session, captured: Session, exact: Session | None = None, steps: int = 12,
                       verify: int = 1) -> None:
    """fp32 runs (no `exact`) are held strictly; bf16 runs against `exact`, the fp32 eager path."""
    agreement = Agreement(strict=exact is None)

    def forward(rows, logit_rows):
        a, b = (s.runner.forward(s.inputs(rows), logit_rows) for s in (eager, captured))
        agreement.add(a, b, None if exact is None else exact.runner.forward(exact.inputs(rows), logit_rows))
        return a

    # Sequence 0's prompt has more rows than the largest captured size (eager on both sides); sequence 1's
    # fits, so the captured side prefills it with the program.
    prompts = {0: list(range(3, 23)), 1: list(range(40, 47))}
    for seq, prompt in prompts.items():
        forward([(seq, t, p) for p, t in enumerate(prompt)], [len(prompt) - 1])
    last = {seq: (prompt[-1], len(prompt) - 1) for seq, prompt in prompts.items()}
    for _ in range(steps):
        # each sequence re-feeds its last token plus `verify - 1` guesses (MTP verification rows)
        rows = []
        for seq, (token, position) in last.items():
            rows += [(seq, token if i == 0 else (token + i) % 300, position + i) for i in range(verify)]
        chosen = forward(rows, list(range(len(rows)))).argmax(-1).tolist()
        for k, seq in enumerate(last):
            last[seq] = (chosen[k * verify], last[seq][1] + 1)
    agreement.check()


@pytest.mark.parametrize("kind", ["glm45_like", "air_like", "grouped", "one_kv_head"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_step_matches_eager(folders, kind, dtype):
    eager, captured = runners(folders[kind], dtype)
    run_teacher_forced(eager, captured, None if dtype == torch.float32 else exact_session(folders[kind]))


@pytest.mark.parametrize("quantization, lm_head", [("fp8", None), ("int8", None), ("int4", None), ("int4", "int8"),
                                                   ("int8", "none")])
def test_captured_step_matches_eager_for_packed_weights(folders, quantization, lm_head):
    eager, captured = runners(folders["glm45_like"], torch.bfloat16, quantization, lm_head_quantization=lm_head)
    head = eager.runner.model.lm_head
    expected = quantization if lm_head is None else None if lm_head == "none" else lm_head
    assert (head.packed.format if hasattr(head, "packed") else None) == expected
    run_teacher_forced(eager, captured, exact_session(folders["glm45_like"], quantization, lm_head))


def test_captured_step_matches_eager_with_an_fp8_kv_cache(folders):
    eager, captured = runners(folders["air_like"], torch.float32, kv_cache_dtype="fp8")
    assert eager.runner.kv_cache.dtype == torch.float8_e4m3fn
    # Both paths store e4m3 rounded to nearest and saturated at ±448, and widen it exactly on read.
    run_teacher_forced(eager, captured)


def test_verification_rows_and_mtp_drafts_match_eager(folders):
    eager, captured = runners(folders["mtp"], torch.float32)
    run_teacher_forced(eager, captured, steps=6, verify=3)
    rows = [(0, 5, 30), (0, 6, 31), (1, 7, 17)]
    for session in (eager, captured):
        session.runner.forward(session.inputs(rows), [1, 2])
    draft_rows = [(0, 6, 30), (0, 9, 31), (1, 8, 17)]
    a = eager.runner.draft(eager.inputs(draft_rows), [0, 1, 2], [1, 2])
    b = captured.runner.draft(captured.inputs(draft_rows), [0, 1, 2], [1, 2])
    Agreement(strict=True).add(a, b)
    chained = [(0, 11, 32), (1, 12, 18)]  # a second draft step carries h' of the first
    a = eager.runner.draft(eager.inputs(chained), None, [0, 1])
    b = captured.runner.draft(captured.inputs(chained), None, [0, 1])
    Agreement(strict=True).add(a, b)


@pytest.mark.parametrize("k", [0, 1])
def test_bundled_model_greedy_text_is_identical(k):
    prompts = ["[gMASK]<sop><|user|>\nWhat is the weather in Oslo?<|assistant|>",
               "[gMASK]<sop><|user|>\nConvert 3 km to miles./nothink<|assistant|>\n<think></think>"]
    params = SamplingParams(temperature=0, max_tokens=48)
    texts = {}
    for eager in (True, False):
        llm = LLM(enforce_eager=eager, num_speculative_tokens=k, dtype="float32")
        assert (llm.engine.runner.captured is None) == eager
        texts[eager] = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
    assert texts[True] == texts[False]


def test_many_bf16_rows_match_eager_head_and_draft_included(folders):
    """Four sequences (all the test cache holds) decoding together in bf16: from two rows the program's bf16
    products (projections, experts, the head) take the dot-product path on CPUs with AVX512-BF16; the target's
    logits and the MTP layer's agree with the eager path as the fewer-row steps do."""
    eager, captured = runners(folders["mtp"], torch.bfloat16)
    sessions = (eager, captured, exact_session(folders["mtp"]))
    agreement = Agreement(strict=False)

    def compare(rows, logit_rows, draft_rows=None):
        outputs = [s.runner.forward(s.inputs(rows), logit_rows) if draft_rows is None else
                   s.runner.draft(s.inputs(rows), logit_rows, draft_rows) for s in sessions]
        agreement.add(*outputs)
        return outputs[0]

    last = {}
    for seq in range(4):
        compare([(seq, 11 * seq + t, t) for t in range(5)], [4])
        last[seq] = (11 * seq + 4, 4)
    for _ in range(8):
        rows = [(seq, token, position) for seq, (token, position) in last.items()]
        a = compare(rows, list(range(4)))
        last = {seq: (token, position + 1) for seq, token, (_, position) in
                zip(last, a.argmax(-1).tolist(), last.values(), strict=True)}
    rows = [(seq, token, position) for seq, (token, position) in last.items()]
    logit_rows = list(range(4))
    for s in sessions:
        s.runner.forward(s.inputs(rows), logit_rows)
    compare(rows, logit_rows, logit_rows)
    agreement.check()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_program_greedy_draft_step_equals_verifying_then_drafting(folders, dtype):
    """The one-program greedy MTP step (rows [x_n, d] per sequence → the target's argmax t at each row → the MTP
    layer over the pairs (h_r, t_r) → its argmax) against the captured programs run one after another (which the
    tests above hold to the eager path): the same argmaxes at every row, bit for bit, over steps that accept and
    steps that reject their drafts."""
    _, one = runners(folders["mtp"], dtype)
    _, ref = runners(folders["mtp"], dtype)
    prompts = {0: list(range(3, 10)), 1: list(range(40, 45))}
    last = {}
    for session in (one, ref):
        for seq, prompt in prompts.items():
            rows = [(seq, t, p) for p, t in enumerate(prompt)]
            session.runner.forward(session.inputs(rows), [])
            pairs = [(seq, t, p) for p, t in enumerate(prompt[1:])]  # (h_p, x_{p+1}) at position p
            session.runner.draft(session.inputs(pairs), list(range(len(pairs))), [])
    for seq, prompt in prompts.items():
        last[seq] = (prompt[-1], len(prompt) - 1, (prompt[-1] * 7) % 300)  # pending token, its position, a draft
    accepted = rejected = 0
    for _ in range(10):
        rows = [r for seq, (token, n, d) in last.items() for r in ((seq, token, n), (seq, d, n + 1))]
        targets, accepted_now, drafts, _, _ = one.runner.draft_step(one.inputs(rows), {})
        logits = ref.runner.forward(ref.inputs(rows), list(range(len(rows))))
        expected_targets = logits.argmax(-1).tolist()
        pairs = [(seq, t, position) for (seq, _, position), t in zip(rows, expected_targets, strict=True)]
        draft_logits = ref.runner.draft(ref.inputs(pairs), list(range(len(rows))), list(range(len(rows))))
        assert targets == expected_targets
        assert drafts == draft_logits.argmax(-1).tolist()
        for b, (seq, (_, n, d)) in enumerate(list(last.items())):
            assert accepted_now[b] == (targets[2 * b] == d)
            if targets[2 * b] == d:
                accepted += 1
                last[seq] = (targets[2 * b + 1], n + 2, drafts[2 * b + 1])
            else:
                rejected += 1
                last[seq] = (targets[2 * b], n + 1, drafts[2 * b])
    assert accepted and rejected, (accepted, rejected)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bundled_model_one_program_draft_steps_match_separate_ones(dtype, monkeypatch):
    """MTP (k=1) on the bundled model: the one-program step gives the same text, and accepts the same drafts, as
    verification followed by separate drafting (the step turned off): greedy requests, greedy ones under the
    server's tool-call constraint (which leaves text outside calls free and chooses a call's name whole), and seeded
    sampled ones (rejection sampling with the same uniforms), batched and one by one."""
    from glm45.chat import plan_chat
    from glm45.engine.draft_step import DraftSteps

    prompts = ["[gMASK]<sop><|user|>\nWhat is the weather in Oslo?<|assistant|>",
               "[gMASK]<sop><|user|>\nConvert 3 km to miles./nothink<|assistant|>\n<think></think>",
               "[gMASK]<sop><|user|>\nTell me about Lisbon.<|assistant|>"]
    tools = [{"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
        for name in ("get_weather", "get_time")]
    plans = [plan_chat([{"role": "user", "content": question}], tools, "auto")
             for question in ("What's the weather in Oslo?", "Hello! Who are you?")]
    params = [SamplingParams(temperature=0, max_tokens=64)] * 3 + [
        SamplingParams(temperature=0, max_tokens=64, structured_outputs=plan.structured_outputs()) for plan in plans]
    params += [SamplingParams(temperature=1.0, max_tokens=64, seed=1),
               SamplingParams(temperature=0.6, top_p=0.95, max_tokens=64, seed=2),
               SamplingParams(temperature=0.8, top_k=20, min_p=0.05, max_tokens=64, seed=3),
               SamplingParams(temperature=2.0, max_tokens=64, seed=4)]  # hot enough to reject drafts
    prompts += [plan.prompt for plan in plans] + prompts[:3] + prompts[:1]
    # Sampled under the tool-call constraint, and a JSON answer (masks on most rows), greedy and sampled.
    answer = StructuredOutputsParams(json={"type": "object", "properties": {"city": {"type": "string"}},
                                           "required": ["city"]})
    params += [SamplingParams(temperature=temperature, max_tokens=64, seed=seed,
                              structured_outputs=plan.structured_outputs())
               for plan in plans for temperature, seed in ((1.0, 5), (2.0, 6))]
    params += [SamplingParams(temperature=0, max_tokens=48, structured_outputs=answer),
               SamplingParams(temperature=1.0, max_tokens=48, seed=7, structured_outputs=answer)]
    prompts += [plan.prompt for plan in plans for _ in range(2)] + [prompts[1]] * 2
    results = {}
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(DraftSteps, "applies", lambda self, batch: False)
        llm = LLM(num_speculative_tokens=1, dtype=dtype)
        runner = llm.engine.runner
        calls = []  # per call of the one-program step: whether each sampled sequence's draft was accepted
        masked = []  # per call: the rows a constraint masked

        def step(inputs, sampled, token_masks, calls=calls, masked=masked, original=runner.draft_step):
            out = original(inputs, sampled, token_masks)
            calls.append([out[1][b] for b in sampled])
            masked.append(sorted(token_masks))
            return out

        monkeypatch.setattr(runner, "draft_step", step)
        texts = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
        texts += [llm.generate(p, q, use_tqdm=False)[0].outputs[0].text
                  for p, q in zip(prompts, params, strict=True)]  # batches of one
        stats = llm.engine.executor.stats
        results[fused] = (texts, stats.proposed, stats.accepted)
        assert bool(calls) == fused
        sampled_verdicts = [a for call in calls for a in call]
        # greedy-only steps, and steps with sampled sequences whose drafts were accepted and rejected
        assert not fused or ([] in calls and True in sampled_verdicts and False in sampled_verdicts)
        # masked steps, with both verify rows masked and with sampled sequences among them
        assert not fused or any(rows and any(r % 2 for r in rows) for rows in masked)
        assert not fused or any(rows and call for rows, call in zip(masked, calls, strict=True))
    assert results[True] == results[False]
