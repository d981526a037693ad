"""Logit processing: penalties, temperature, top-k, top-p, min-p — each against its definition."""

import torch

from glm45.engine.sampler import apply_penalties, draw, probabilities
from glm45.engine.sampling_params import SamplingParams


def test_penalties_follow_their_definitions():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    got = apply_penalties(logits, params, prompt_ids=[0], output_ids=[1, 1, 2])
    # repetition: tokens 0, 1, 2 seen → positive logits halved, negative doubled
    # presence 0.5 and frequency 0.25 × count for output tokens 1 (×2) and 2 (×1)
    expected = torch.tensor([1.0, -2.0 - 0.5 - 0.5, 0.25 - 0.5 - 0.25, 3.0])
    assert torch.allclose(got, expected)
    assert torch.equal(apply_penalties(logits, SamplingParams(), [0], [1]), logits)


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


def test_draw_samples_the_distribution():
    probs = torch.tensor([0.1, 0.6, 0.3])
    generator = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([draw(probs, generator) for _ in range(6000)]), minlength=3)
    assert torch.allclose(counts / 6000, probs, atol=0.025)
