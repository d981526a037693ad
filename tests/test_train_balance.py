"""Loss-free balancing moves the routers' biases toward equal loads; the sequence balance loss is DeepSeek-V3's."""

import pytest
import torch
from train_helpers import tiny_model_config

from glm45.model import Glm4MoeForCausalLM
from glm45.model.moe import Router
from glm45.train.balance import RouterMonitor


@pytest.fixture
def tiny_config():
    return tiny_model_config()


def imbalanced_model(tiny_config):
    """A model whose routers all prefer expert 0 then 1 by a wide margin."""
    torch.manual_seed(0)
    model = Glm4MoeForCausalLM(tiny_config)
    model.init_weights(0.02, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Router):
                module.e_score_correction_bias.copy_(torch.tensor([0.5, 0.3, 0.0, -0.2]))
    return model


def test_balancing_moves_biases_against_the_load(tiny_config):
    model = imbalanced_model(tiny_config)
    monitor = RouterMonitor(model)
    ids = torch.randint(0, 320, (2, 12))
    model(ids)
    before = {name: r.e_score_correction_bias.clone() for name, r in monitor.routers.items()}
    loads = {name: load.clone() for name, load in monitor.loads.items() if not name.startswith("mtp.")}
    assert set(loads) == {"model.layers.1.mlp.gate", "model.layers.2.mlp.gate"}
    assert monitor.loads["mtp.mlp.gate"].sum() == 0  # the MTP layer did not run
    for name in loads:  # every token chose experts 0 and 1
        assert loads[name].tolist() == [24.0, 24.0, 0.0, 0.0]
    stats = monitor.load_stats()
    assert stats["model.layers.1.mlp.gate"] == pytest.approx(2.0)
    monitor.update_biases(gamma=0.01)
    for name, router in monitor.routers.items():
        if name.startswith("mtp."):  # no load seen: untouched
            assert torch.equal(router.e_score_correction_bias, before[name])
            continue
        moved = router.e_score_correction_bias - before[name]
        torch.testing.assert_close(moved, torch.tensor([-0.01, -0.01, 0.01, 0.01]))
    # Repeated updates even the load out.
    for _ in range(80):
        monitor.reset()
        model(ids)
        monitor.update_biases(gamma=0.01)
    assert max(monitor.load_stats()[n] for n in loads) < 2.0


def test_padding_is_not_counted(tiny_config):
    model = imbalanced_model(tiny_config)
    monitor = RouterMonitor(model)
    ids = torch.randint(0, 320, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    monitor.token_mask = mask
    hidden = model.hidden_states(ids)
    model.mtp_draft(ids[:, 1:], hidden[:, :-1], torch.arange(9))
    assert monitor.loads["model.layers.1.mlp.gate"].sum() == 16 * 2  # 16 real tokens, top-2
    assert monitor.loads["mtp.mlp.gate"].sum() == (9 + 5) * 2  # pairs (h_t, x_t+1) with a real x_t+1
    with monitor.paused():
        model(ids)
    assert monitor.loads["model.layers.1.mlp.gate"].sum() == 32


def test_sequence_balance_loss_matches_its_definition(tiny_config):
    model = imbalanced_model(tiny_config)
    monitor = RouterMonitor(model.model.layers[1], seq_aux_weight=0.1)  # only the first MoE layer
    monitor.token_mask = torch.ones(3, 7, dtype=torch.bool)
    captured = {}
    router = model.model.layers[1].mlp.gate
    handle = router.register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    model(torch.randint(0, 320, (3, 7)))
    handle.remove()
    total = monitor.take_aux_loss()
    assert monitor.take_aux_loss() is None and total.requires_grad
    _, topk_ids, scores = captured["out"]
    expected = 0.0
    num_experts, top_k = 4, 2
    for seq in range(3):
        s = scores.detach().view(3, 7, 4)[seq]
        chosen = torch.zeros(7, 4).scatter_(1, topk_ids.view(3, 7, 2)[seq], 1.0)
        f = num_experts / (top_k * 7) * chosen.sum(0)
        p = (s / s.sum(-1, keepdim=True)).mean(0)
        expected += 0.1 * float((f * p).sum()) / 3
    assert float(total.detach()) == pytest.approx(expected, rel=1e-5)
    monitor.remove()


def test_bad_settings_are_rejected(tiny_config):
    model = Glm4MoeForCausalLM(tiny_config)
    with pytest.raises(ValueError, match="gamma"):
        RouterMonitor(model).update_biases(-1.0)
    with pytest.raises(ValueError, match="weight"):
        RouterMonitor(model, seq_aux_weight=-0.1)
