"""Muon for matrices and expert stacks, checked against torch.optim.Muon; the learning-rate schedule."""

import math

import pytest
import torch
from train_helpers import tiny_model_config

from glm45.model import Glm4MoeForCausalLM
from glm45.train.optim import BatchedMuon, build_optimizer, lr_factor, muon_lr_scale, split_parameters


@pytest.fixture
def tiny_config():
    return tiny_model_config()


def _step(optimizer, params, grads):
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    optimizer.step()


def test_batched_muon_matches_torch_muon_on_matrices():
    torch.manual_seed(0)
    shapes = [(24, 40), (48, 16)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = BatchedMuon(ours, lr=0.02, weight_decay=0.1, ns_dtype=torch.bfloat16)
    ref_opt = torch.optim.Muon(ref, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        grads = [torch.randn(s) for s in shapes]
        _step(opt, ours, grads)
        _step(ref_opt, ref, grads)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_batched_muon_treats_each_expert_slice_as_its_own_matrix():
    torch.manual_seed(1)
    stack = torch.nn.Parameter(torch.randn(4, 12, 20))
    slices = [torch.nn.Parameter(stack.detach()[e].clone()) for e in range(4)]
    # float32 so that the batched and the per-slice matmuls agree to rounding
    opt = BatchedMuon([stack], lr=0.05, ns_dtype=torch.float32)
    ref_opt = BatchedMuon(slices, lr=0.05, ns_dtype=torch.float32)
    for _ in range(2):
        grad = torch.randn(4, 12, 20)
        _step(opt, [stack], [grad])
        _step(ref_opt, slices, list(grad))
    torch.testing.assert_close(stack.detach(), torch.stack([s.detach() for s in slices]), atol=1e-6, rtol=1e-6)
    assert muon_lr_scale(stack.shape) == pytest.approx(0.2 * math.sqrt(20))


def test_float32_newton_schulz_orthogonalises():
    torch.manual_seed(2)
    p = torch.nn.Parameter(torch.zeros(16, 32))
    opt = BatchedMuon([p], lr=1.0 / muon_lr_scale(p.shape), momentum=0.0, nesterov=False, ns_dtype=torch.float32)
    _step(opt, [p], [torch.randn(16, 32)])
    singular = torch.linalg.svdvals(-p.detach())
    assert singular.min() > 0.5 and singular.max() < 1.3  # Muon's quintic lands in roughly [0.7, 1.2]


def test_parameter_split_puts_embeddings_heads_norms_routers_on_adamw(tiny_config):
    model = Glm4MoeForCausalLM(tiny_config)
    matrices, stacks, others = split_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in stacks} >= {"model.layers.1.mlp.experts.gate_up_proj", "mtp.mlp.experts.down_proj"}
    other_names = {names[id(p)] for p in others}
    for expected in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                     "mtp.shared_head.head.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.bias"):
        assert expected in other_names
    assert "mtp.eh_proj.weight" in {names[id(p)] for p in matrices}
    assert all(p.dim() == 2 for p in matrices) and all(p.dim() == 3 for p in stacks)
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(model, "sgd", 1e-3)


def test_warmup_then_cosine():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, min_ratio=0.0) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, min_ratio=0.1) == pytest.approx(0.1)
