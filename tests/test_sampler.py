"""Logit processing: penalties, temperature, top-k, top-p, min-p — each against its definition; the batched
path (what the engine runs) against the row-at-a-time definitions, the host kernel (CPUs) against the tensor path,
batch invariance of seeded rows, no host syncs before the tokens are read, and MTP's batched rejection sampling
keeping the target distribution."""

import pytest
import torch
from test_sync_free import OpCounter

from glm45.engine import sampler
from glm45.engine.sampler import (
    Sampler,
    apply_penalties,
    choose,
    distributions,
    draw_rows,
    penalise,
    probabilities,
    uniforms,
)
from glm45.engine.sampling_params import SamplingParams
from glm45.engine.sequence import Sequence
from glm45.engine.speculative import verify


def test_penalties_follow_their_definitions():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    got = apply_penalties(logits, params, prompt_ids=[0], output_ids=[1, 1, 2])
    # repetition: tokens 0, 1, 2 seen → positive logits halved, negative doubled
    # presence 0.5 and frequency 0.25 × count for output tokens 1 (×2) and 2 (×1)
    expected = torch.tensor([1.0, -2.0 - 0.5 - 0.5, 0.25 - 0.5 - 0.25, 3.0])
    assert torch.allclose(got, expected)
    assert torch.equal(apply_penalties(logits, SamplingParams(), [0], [1]), logits)


def test_pending_tokens_count_as_generated_for_penalties():
    """Tokens a sequence takes before the sampled one (a tool name chosen whole) are penalised as output."""
    seq = Sequence("r", [0], SamplingParams(temperature=0, presence_penalty=2.0), eos_token_ids=[9])
    logits = torch.tensor([[0.0, 1.5, 1.0, 0.0]])
    assert Sampler()(logits.clone(), [seq])[0][0] == 1
    assert Sampler()(logits.clone(), [seq], pending=[[1]])[0][0] == 2


def test_filters_keep_the_right_tokens():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    assert (probabilities(logits, SamplingParams(top_k=2)) > 0).tolist() == [True, True, False, False, False]
    # top_p=0.7: 0.5 alone is short of 0.7, so 0.2 is kept too; the rest is dropped
    assert (probabilities(logits, SamplingParams(top_p=0.7)) > 0).tolist() == [True, True, False, False, False]
    # min_p=0.25: keep tokens with p ≥ 0.25 × 0.5
    assert (probabilities(logits, SamplingParams(min_p=0.25)) > 0).tolist() == [True, True, True, False, False]
    cold = probabilities(logits, SamplingParams(temperature=0.5))
    squared = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]) ** 2  # temperature 0.5 squares the probabilities
    assert torch.allclose(cold, squared / squared.sum(), atol=1e-5)
    assert torch.isclose(cold.sum(), torch.tensor(1.0))


def test_draw_rows_samples_each_rows_distribution():
    probs = torch.tensor([[0.1, 0.6, 0.3, 0.0], [0.0, 0.0, 0.5, 0.5]]).repeat(3000, 1)
    tokens = draw_rows(probs * 7.0, uniforms([torch.Generator().manual_seed(0)], 6000, torch.device("cpu"))[0])
    for row in (0, 1):
        counts = torch.bincount(tokens[row::2], minlength=4) / 3000
        assert torch.allclose(counts, probs[row], atol=0.03), counts
    # a zero-probability token is never drawn, even by u at the very top of [0, 1)
    edge = torch.tensor([[0.3, 0.7, 0.0, 0.0]])
    assert draw_rows(edge, torch.tensor([1.0 - 2**-24])).item() == 1
    assert draw_rows(edge, torch.tensor([0.0])).item() == 0


PARAMS = [SamplingParams(temperature=0), SamplingParams(temperature=0.7), SamplingParams(top_k=5),
          SamplingParams(top_k=1500, temperature=1.3), SamplingParams(top_p=0.8), SamplingParams(top_k=40, top_p=0.6),
          SamplingParams(min_p=0.05, temperature=0.9), SamplingParams(top_k=3, top_p=0.9, min_p=0.2),
          SamplingParams(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.3, top_p=0.95),
          SamplingParams(temperature=0, repetition_penalty=0.8), SamplingParams(top_k=1)]


@pytest.mark.parametrize("vocab, scale, small_k_only", [
    (300, 3.0, False),   # the whole vocabulary is within TOPK_LIMIT: one sort
    (2000, 3.0, False),  # top-k 1500 is past TOPK_LIMIT: one sort
    (5000, 3.0, True),   # torch.topk, every top-p nucleus inside it
    (5000, 0.01, True),  # a flat row's top-p nucleus spills over: one sort
])
def test_batched_distributions_equal_the_row_definitions(vocab, scale, small_k_only):
    params = [p for p in PARAMS if p.top_k < 1024] if small_k_only else PARAMS
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(len(params), vocab, generator=generator) * scale
    prompts = [torch.randint(0, vocab, (9,), generator=generator).tolist() for _ in params]
    outputs = [torch.randint(0, vocab, (i,), generator=generator).tolist() for i in range(len(params))]
    penalised = penalise(logits, params, prompts, outputs)
    got = distributions(penalised, params)
    for i, row_params in enumerate(params):
        expected_logits = apply_penalties(logits[i], row_params, prompts[i], outputs[i])
        assert torch.allclose(penalised[i], expected_logits, atol=1e-6), i
        assert torch.allclose(got[i], probabilities(expected_logits, row_params), atol=1e-6), i
        # and each row alone gives the same as in the batch (the cut never depends on the neighbours)
        alone = distributions(penalise(logits[i:i + 1], [row_params], [prompts[i]], [outputs[i]]), [row_params])
        assert torch.equal(alone[0], got[i]), i
    generators = [torch.Generator().manual_seed(i) for i in range(len(params))]
    tokens = choose(penalised, params, generators)
    for i, row_params in enumerate(params):
        if row_params.greedy or row_params.top_k == 1:
            assert tokens[i] == penalised[i].argmax()
        assert got[i, tokens[i]] > 0  # drawn from the row's own support


def test_a_truncating_row_draws_its_nucleus_in_proportion():
    """Truncating rows draw among their nucleus (token ids gathered back from torch.topk's order): the frequencies
    over 4,000 draws match the row definitions."""
    vocab, draws = 3000, 4000
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(7)) * 2
    logits[:4] = torch.tensor([9.0, 8.5, 8.0, 7.0])
    for params in (SamplingParams(top_k=3), SamplingParams(top_p=0.9, temperature=0.8),
                   SamplingParams(top_k=50, top_p=0.95, min_p=0.05)):
        expected = probabilities(logits, params)
        tokens = choose(logits.expand(draws, vocab), [params] * draws,
                        [torch.Generator().manual_seed(i) for i in range(draws)])
        counts = torch.bincount(tokens, minlength=vocab) / draws
        assert set(tokens.tolist()) <= set(expected.nonzero()[:, 0].tolist())
        assert torch.allclose(counts, expected, atol=0.03), params


def sequences(params: list[SamplingParams], seed: int = 0) -> list[Sequence]:
    return [Sequence(f"r{i}", [1, 2, 3], p, [0], None if p.greedy else torch.Generator().manual_seed(seed + i))
            for i, p in enumerate(params)]


def test_a_seeded_row_draws_the_same_tokens_whatever_its_batch():
    vocab = 400
    steps = [torch.randn(8, vocab, generator=torch.Generator().manual_seed(s)) for s in range(6)]
    params = SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.2)
    alone, crowd = sequences([params]), sequences([SamplingParams(top_k=7)] * 3 + [params] + PARAMS[:4], seed=50)
    crowd[3].generator = torch.Generator().manual_seed(0)
    sampler = Sampler()
    for logits in steps:
        (token, _), = sampler(logits[3:4], alone)
        crowded = sampler(logits, crowd)
        assert crowded[3][0] == token
        for seq, (t, _) in zip([alone[0], crowd[3]], [(token, None), crowded[3]], strict=True):
            seq.token_ids.append(t)
    assert len(set(alone[0].output_token_ids)) > 1


def test_sampling_has_no_host_sync_before_the_tokens_are_read(monkeypatch):
    """On the GPU path, penalties, truncation, min-p and the draw run as tensor operations whose number does not
    grow with the rows (parameters are read on the host, never from the device); only reading the tokens waits.
    (On CPUs the host checks whether a top-p nucleus fits the largest TOPK_LIMIT logits; that path is below.)"""
    monkeypatch.setattr(sampler, "WAITS_FOR_CHECKS", ())
    monkeypatch.setattr(sampler, "HOST_KERNEL", False)
    launches = []
    for repeats in (1, 4):
        params = PARAMS * repeats
        seqs = sequences(params)
        for i, seq in enumerate(seqs):
            seq.token_ids += list(range(i))
        counter = OpCounter()
        with counter:
            choose(penalise(torch.randn(len(params), 3000), params, [s.prompt_token_ids for s in seqs],
                            [s.output_token_ids for s in seqs]), params, [s.generator for s in seqs])
        assert counter.syncs == [], counter.syncs
        # the host makes each sampled row's uniform (`rand`) and gathers them (`stack`); the device work is fixed
        launches.append([name for name in counter.names if name not in ("rand", "stack")])
    assert launches[0] == launches[1]


def test_batched_rejection_sampling_keeps_the_target_distribution():
    """Draft from q, verify against p, 20,000 sequences in one batch: the first emitted token is distributed as p
    (chi-square), not as q."""
    vocab, trials = 6, 20000
    p = torch.tensor([0.05, 0.30, 0.10, 0.25, 0.20, 0.10])
    q = torch.tensor([0.30, 0.05, 0.25, 0.10, 0.10, 0.20])
    drafts = torch.multinomial(q, trials, replacement=True, generator=torch.Generator().manual_seed(0)).tolist()
    seqs = sequences([SamplingParams(temperature=1.0)] * trials, seed=1)
    for seq, draft in zip(seqs, drafts, strict=True):
        seq.draft_token_ids, seq.draft_probs = [draft], q[None]
    bonus = torch.zeros(vocab)
    chunks = [torch.stack([p.log(), bonus])] * trials
    first = torch.tensor([tokens[0] for tokens in verify(chunks, seqs)])
    counts = torch.bincount(first, minlength=vocab).float()
    expected = p * trials
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5  # the 99.9% quantile of chi-square with 5 degrees of freedom
    assert float(((counts - q * trials) ** 2 / (q * trials)).sum()) > 1000


def test_greedy_verification_accepts_while_drafts_match():
    logits = torch.full((3, 5), -5.0)
    logits[0, 2] = logits[1, 4] = logits[2, 1] = 5.0
    greedy = sequences([SamplingParams(temperature=0)] * 2)
    greedy[0].draft_token_ids, greedy[1].draft_token_ids = [2, 4], [2, 3]
    assert verify([logits, logits], greedy) == [[2, 4, 1], [2, 4]]


def host_kernel_and_tensor_path(monkeypatch, run):
    """`run()` with the host kernel, then with the tensor path."""
    if not sampler.on_host(torch.zeros(1)):
        pytest.skip("the CPU kernels are not built here (no C compiler or no AVX2)")
    got = run()
    monkeypatch.setattr(sampler, "HOST_KERNEL", False)
    expected = run()
    monkeypatch.setattr(sampler, "HOST_KERNEL", True)
    return got, expected


@pytest.mark.parametrize("vocab, scale", [(300, 3.0), (5000, 3.0), (5000, 0.01), (151552, 4.0)])
def test_host_kernel_distributions_and_draws_equal_the_tensor_path(monkeypatch, vocab, scale):
    """Same distributions (to float rounding, with the same support) and, for the same uniforms, the same tokens:
    every sampled row of PARAMS, masked tokens (−inf) included, 64 draws a row."""
    params = [p for p in PARAMS if not p.greedy and not p.uses_penalties]
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(len(params), vocab, generator=generator) * scale
    logits[::2, torch.randperm(vocab, generator=generator)[: vocab // 3]] = float("-inf")
    got, expected = host_kernel_and_tensor_path(monkeypatch, lambda: distributions(logits, params))
    assert torch.equal(got > 0, expected > 0)
    assert torch.allclose(got, expected, atol=1e-6, rtol=1e-4)
    assert torch.allclose(got.sum(-1), torch.ones(len(params)), atol=1e-5)
    draws = 64
    rows = logits.repeat_interleave(draws, 0)
    row_params = [p for p in params for _ in range(draws)]

    def tokens():
        return choose(rows, row_params, [torch.Generator().manual_seed(i) for i in range(len(row_params))])

    got_tokens, expected_tokens = host_kernel_and_tensor_path(monkeypatch, tokens)
    assert torch.equal(got_tokens, expected_tokens)
    assert bool((expected.repeat_interleave(draws, 0).gather(1, got_tokens[:, None]) > 0).all())
    weights = expected.abs() + 0.5 * (expected > 0)  # a plain draw from given weights, in column order
    u = torch.rand(len(params), generator=generator)
    assert torch.equal(*host_kernel_and_tensor_path(monkeypatch, lambda: draw_rows(weights, u)))


def test_host_kernel_draw_never_takes_a_zero_weight(monkeypatch):
    edge = torch.tensor([[0.3, 0.7, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]])
    for u in (torch.tensor([1.0 - 2**-24, 1.0 - 2**-24]), torch.tensor([0.0, 0.0])):
        got, expected = host_kernel_and_tensor_path(monkeypatch, lambda u=u: draw_rows(edge, u))
        assert torch.equal(got, expected)
    assert draw_rows(edge, torch.tensor([1.0 - 2**-24, 0.5])).tolist() == [1, 3]


@pytest.mark.parametrize("k", [0, 1, 2])
def test_bundled_model_seeded_sampling_is_the_same_on_the_host_kernel(monkeypatch, k):
    """Seeded sampled requests (plain, top-p, top-k with min-p, penalties) on the bundled model, with MTP's
    rejection sampling for k > 0: the host kernel gives the tensor path's tokens and accepts the same drafts."""
    from glm45 import LLM

    prompts = ["[gMASK]<sop><|user|>\nWhat is the weather in Oslo?<|assistant|>",
               "[gMASK]<sop><|user|>\nConvert 3 km to miles./nothink<|assistant|>\n<think></think>",
               "[gMASK]<sop><|user|>\nTell me about Lisbon.<|assistant|>",
               "[gMASK]<sop><|user|>\nWrite a story about a lighthouse.<|assistant|>"]
    # The bundled model's drafts are accepted ~99% of the time at these temperatures; temperature 2 makes the
    # last request's target and draft distributions differ enough that some drafts are surely rejected.
    params = [SamplingParams(temperature=1.5, max_tokens=64, seed=1),
              SamplingParams(temperature=0.6, top_p=0.95, max_tokens=64, seed=2),
              SamplingParams(temperature=0.8, top_k=20, min_p=0.05, presence_penalty=0.5, max_tokens=64, seed=3),
              SamplingParams(temperature=2.0, max_tokens=64, seed=4, ignore_eos=True)]

    def generate():
        llm = LLM(num_speculative_tokens=k, dtype="bfloat16")
        tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        stats = llm.engine.executor.stats
        return tokens, (stats.proposed, stats.accepted) if k else None

    got, expected = host_kernel_and_tensor_path(monkeypatch, generate)
    assert got == expected
    assert all(len(t) > 10 for t in got[0]), [len(t) for t in got[0]]
    assert k == 0 or 0 < sum(got[1][1]) < sum(got[1][0])  # drafts both accepted and rejected


def test_host_penalties_equal_the_tensor_path(monkeypatch):
    """Penalties on the host touch only each row's history; the values are the tensor path's, bit for bit."""
    params = [p for p in PARAMS if p.uses_penalties] + [SamplingParams(frequency_penalty=-0.5, presence_penalty=1.0)]
    params += [SamplingParams()]  # a row without penalties stays as it is
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(len(params), 2000, generator=generator) * 3
    logits[0, :50] = float("-inf")
    prompts = [torch.randint(0, 2000, (30,), generator=generator).tolist() for _ in params]
    outputs = [torch.randint(0, 60, (i * 7,), generator=generator).tolist() for i in range(len(params))]
    got, expected = host_kernel_and_tensor_path(monkeypatch, lambda: penalise(logits, params, prompts, outputs))
    assert torch.equal(got, expected)
    assert not torch.equal(got[:-1], logits[:-1]) and torch.equal(got[-1], logits[-1])


def test_host_kernel_gives_a_valid_token_for_a_degenerate_row(monkeypatch):
    """A row whose every logit is −inf (or NaN) has no distribution; the host kernel still returns an id in range
    (the row's first maximum), never one past the vocabulary, for plain and truncating parameters alike."""
    if not sampler.on_host(torch.zeros(1)):
        pytest.skip("the CPU kernels are not built here (no C compiler or no AVX2)")
    logits = torch.full((4, 300), float("-inf"))
    logits[1, 7] = float("nan")
    logits[2, 123] = 5.0  # one finite logit: always that token
    logits[3] = torch.randn(300)
    for params in (SamplingParams(temperature=0.8), SamplingParams(top_p=0.9), SamplingParams(top_k=5)):
        tokens = choose(logits, [params] * 4, [torch.Generator().manual_seed(i) for i in range(4)]).tolist()
        assert tokens[:3] == [0, 7, 123] and 0 <= tokens[3] < 300
        assert draw_rows(torch.zeros(2, 300), torch.tensor([0.5, 0.9])).tolist() == [0, 0]
    monkeypatch.setattr(sampler, "HOST_KERNEL", False)  # the tensor path's draw, too
    assert draw_rows(torch.zeros(2, 300), torch.tensor([0.5, 0.9])).tolist() == [0, 0]
    assert draw_rows(torch.full((1, 300), float("nan")), torch.tensor([0.5])).tolist() == [0]
