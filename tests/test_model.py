"""Numerical parity of glm45's model with transformers' Glm4MoeForCausalLM, and the MTP layer's maths."""

import pytest
import torch
from tiny_checkpoints import build_reference

from glm45.config import ModelConfig
from glm45.model import Glm4MoeForCausalLM
from glm45.model.moe import Router


def prompts(vocab: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (3, 24), generator=generator)


def test_float32_logits_match_transformers(tiny_checkpoint):
    kind, folder = tiny_checkpoint
    reference = build_reference(kind)
    ours = Glm4MoeForCausalLM.from_pretrained(folder, dtype="float32", progress=False)
    ids = prompts(reference.config.vocab_size)
    with torch.no_grad():
        expected = reference(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape == (3, 24, reference.config.vocab_size)
    scale = expected.abs().max()
    assert (got - expected).abs().max() / scale < 1e-4
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_bfloat16_logits_match_transformers(tiny_checkpoint):
    """In bf16 both implementations round differently, and a near-tie in expert selection can flip at a
    token, so "bf16 tolerance" is measured against the float32 truth: our bf16 error must be no larger
    than transformers' own bf16 error on the same weights."""
    kind, folder = tiny_checkpoint
    truth_model = build_reference(kind)
    reference = build_reference(kind, dtype=torch.bfloat16)
    ours = Glm4MoeForCausalLM.from_pretrained(folder, dtype="bfloat16", progress=False)
    assert ours.model.layers[-1].mlp.gate.weight.dtype == torch.float32  # router stays fp32, as upstream
    ids = prompts(reference.config.vocab_size)
    with torch.no_grad():
        truth = truth_model(ids).logits
        theirs = reference(ids).logits.float()
        got = ours(ids).float()
    our_error = (got - truth).abs().mean()
    their_error = (theirs - truth).abs().mean()
    assert our_error <= 1.5 * their_error + 1e-3, (our_error, their_error)
    # Most positions agree elementwise to a few bf16 ulps of the logit scale.
    close = ((got - theirs).abs().amax(-1) < 0.05 * truth.abs().max()).float().mean()
    assert close > 0.8
    our_agreement = (got.argmax(-1) == truth.argmax(-1)).float().mean()
    their_agreement = (theirs.argmax(-1) == truth.argmax(-1)).float().mean()
    assert our_agreement >= their_agreement - 0.1


def test_routing_is_grouped_and_bias_selects_only():
    config = ModelConfig(hidden_size=8, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=1,
                         routed_scaling_factor=2.0, num_attention_heads=2, num_key_value_heads=1, head_dim=4)
    router = Router(config)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:, 0] = torch.tensor([0.0, 0.0, 3.0, -3.0, 1.0, 1.0, 0.0, 0.0])
        router.e_score_correction_bias.copy_(torch.tensor([0, 0, 0, 0, 0.0, 0.0, 5.0, 5.0]))
    x = torch.zeros(1, 8)
    x[0, 0] = 1.0
    weights, ids, scores = router(x)
    # Group 3 (experts 6, 7) wins on the bias alone; its weights are the unbiased sigmoid(0) = 0.5 each,
    # renormalised to 0.5 and scaled by 2.0.
    assert sorted(ids[0].tolist()) == [6, 7]
    assert torch.allclose(weights, torch.full((1, 2), 1.0))


def test_mtp_draft_follows_the_reference_formula():
    config = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2, use_qk_norm=True)
    torch.manual_seed(0)
    model = Glm4MoeForCausalLM(config)
    model.init_weights(std=0.1)
    with torch.no_grad():
        for norm in (model.mtp.enorm, model.mtp.hnorm, model.mtp.shared_head.norm):
            norm.weight.uniform_(0.5, 1.5)
    ids = torch.randint(0, 50, (2, 10))
    mtp = model.mtp
    with torch.no_grad():
        hidden = model.hidden_states(ids)                              # after model.norm
        h_t, next_tokens = hidden[:, :-1], ids[:, 1:]
        positions = torch.arange(9)
        got_h, got_logits = model.mtp_draft(next_tokens, h_t, positions)

        # By hand: embedding first, then the hidden state; one pre-norm MoE block; shared head.
        x = mtp.eh_proj(torch.cat([mtp.enorm(mtp.embed_tokens(next_tokens)), mtp.hnorm(h_t)], dim=-1))
        rope = model.rope(positions, x.dtype)
        x = x + mtp.self_attn(mtp.input_layernorm(x), rope)
        x = x + mtp.mlp(mtp.post_attention_layernorm(x))
        expected_h = mtp.shared_head.norm(x)
        expected_logits = mtp.shared_head.head(expected_h)
    assert torch.allclose(got_h, expected_h, atol=1e-6)
    assert torch.allclose(got_logits, expected_logits, atol=1e-6)
    # The MTP block is an MoE block with its own embedding and head (not the main model's).
    assert type(mtp.mlp).__name__ == "MoE"
    assert mtp.embed_tokens.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_model_without_mtp_rejects_drafting(tiny_checkpoint):
    _, folder = tiny_checkpoint
    model = Glm4MoeForCausalLM.from_pretrained(folder, dtype="float32", progress=False)
    assert model.mtp is None  # transformers writes no MTP layer
    with pytest.raises(ValueError, match="no MTP layer"):
        token, position = torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
        model.mtp_draft(token, torch.zeros(1, 1, 64), position)


def test_full_sequence_call_wants_batch_and_time():
    config = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         n_routed_experts=4, num_experts_per_tok=2, num_nextn_predict_layers=0)
    model = Glm4MoeForCausalLM(config)
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        model(torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_inference_expert_path_equals_the_training_path_bit_for_bit(dtype):
    """Many tokens at inference take `Experts._by_expert` (each expert weights and adds its outputs while they are in
    cache); with gradients on, the concatenating path. Same sums in the same order: identical outputs."""
    from train_helpers import tiny_model_config

    model = Glm4MoeForCausalLM(tiny_model_config())
    model.init_weights(0.2, torch.Generator().manual_seed(0))
    experts = model.model.layers[1].mlp.experts.to(dtype)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(40, experts.gate_up_proj.shape[-1], generator=generator).to(dtype)
    weights = torch.rand(40, 2, generator=generator)
    ids = torch.randint(0, experts.num_experts, (40, 2), generator=generator)
    ids[:, 1] = (ids[:, 0] + 1) % experts.num_experts
    with torch.no_grad():
        fast = experts(x, weights, ids)
    with torch.enable_grad():
        reference = experts(x, weights, ids)
    assert torch.equal(fast, reference.detach())
