"""The MTP loss: a hand-computed value on a tiny case, agreement with `mtp_draft`, and no effect when disabled."""

import pytest
import torch
import torch.nn.functional as F
from train_helpers import tiny_model_config

from glm45.model import Glm4MoeForCausalLM
from glm45.train.data import Batch
from glm45.train.losses import masked_cross_entropy, mtp_hidden, mtp_loss
from glm45.train.optim import build_optimizer
from glm45.train.trainer import compute_losses


@pytest.fixture
def tiny_config():
    return tiny_model_config()


@pytest.fixture
def model(tiny_config):
    model = Glm4MoeForCausalLM(tiny_config)
    model.init_weights(0.1, torch.Generator().manual_seed(0))
    return model


def test_mtp_loss_matches_a_hand_computed_value(model):
    torch.manual_seed(0)
    ids = torch.randint(0, 320, (2, 6))
    labels = torch.full((2, 6), -100)
    labels[:, :-1] = ids[:, 1:]
    labels[0, 1] = -100  # x_2 of row 0 not trained → the MTP draft at position 0 is not either
    hidden = model.hidden_states(ids)
    # By hand, one pair at a time: position t of row b drafts x_{t+2} from (h_t, x_{t+1}).
    _, logits = model.mtp_draft(ids[:, 1:], hidden[:, :-1], torch.arange(5))
    terms = []
    for b in range(2):
        for t in range(4):  # x_{t+2} exists for t ≤ 3
            if b == 0 and t == 0:
                continue
            terms.append(-F.log_softmax(logits[b, t], -1)[ids[b, t + 2]])
    expected = torch.stack(terms).mean()
    torch.testing.assert_close(mtp_loss(model, hidden, ids, labels), expected, rtol=1e-5, atol=1e-6)
    h_prime, _ = model.mtp_draft(ids[:, 1:], hidden[:, :-1], torch.arange(5))
    torch.testing.assert_close(mtp_hidden(model, hidden, ids), h_prime)


def test_masked_cross_entropy_equals_the_full_one(model):
    hidden = torch.randn(2, 5, 32)
    labels = torch.tensor([[3, -100, 7, -100, -100], [-100, 1, 2, 3, -100]])
    full = F.cross_entropy(model.lm_head(hidden).reshape(-1, 320), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(masked_cross_entropy(model.lm_head, hidden, labels), full)


def test_disabled_mtp_gets_no_gradient_and_does_not_move(model):
    ids = torch.randint(0, 320, (2, 8))
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    batch = Batch(ids, labels, torch.ones_like(ids, dtype=torch.bool))
    mtp_before = {n: p.detach().clone() for n, p in model.mtp.named_parameters()}
    optimizer = build_optimizer(model, "muon", 1e-2)
    losses = compute_losses(model, batch, mtp_weight=0.0)
    assert "mtp" not in losses
    losses["loss"].backward()
    assert all(p.grad is None for p in model.mtp.parameters())
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    optimizer.step()
    for name, p in model.mtp.named_parameters():
        assert torch.equal(p, mtp_before[name]), name
    optimizer.zero_grad()
    losses = compute_losses(model, batch, mtp_weight=0.3)
    torch.testing.assert_close(losses["loss"], losses["lm"] + 0.3 * losses["mtp"])
    losses["loss"].backward()
    assert model.mtp.eh_proj.weight.grad is not None and model.mtp.eh_proj.weight.grad.abs().sum() > 0


def test_model_without_mtp_layer_says_so(tiny_config):
    model = Glm4MoeForCausalLM(tiny_config, with_mtp=False)
    ids = torch.randint(0, 320, (1, 5))
    with pytest.raises(ValueError, match="no MTP layer"):
        mtp_loss(model, model.hidden_states(ids), ids, ids)
