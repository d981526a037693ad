"""LoRA on the routed experts' fused stacks and on the MTP layer: trained factors per expert, saved so that peft loads
the main stack onto the transformers model with the same logits, and the MTP part read back from glm45's own file;
`glm45 merge` folds both into a checkpoint whose logits and MTP drafts equal the adapted model's."""

import json

import pytest
import torch
from train_helpers import tiny_model_config

from glm45.cli import main as cli_main
from glm45.model import Glm4MoeForCausalLM
from glm45.train.data import Batch
from glm45.train.lora import LoRAExperts, apply_lora, merge_lora
from glm45.train.lora_io import load_adapter, save_adapter
from glm45.train.optim import build_optimizer
from glm45.train.trainer import compute_losses

# peft reads MLP names (gate_proj, down_proj, …) as the routed experts under transformers 5: attention + experts here.
TARGETS = ("q_proj", "v_proj", "experts", "eh_proj")
IDS = torch.randint(3, 320, (3, 24), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    model = Glm4MoeForCausalLM(tiny_model_config())
    model.init_weights(0.1, torch.Generator().manual_seed(0))
    folder = tmp_path_factory.mktemp("base")
    model.save_pretrained(folder)
    return folder


def load(folder):
    return Glm4MoeForCausalLM.from_pretrained(folder, dtype=torch.float32, progress=False)


def batch() -> Batch:
    labels = IDS.roll(-1, dims=1)
    labels[:, -1] = -100
    return Batch(IDS, labels, torch.ones_like(IDS, dtype=torch.bool))


def outputs(model):
    """(logits, MTP draft logits) on IDS."""
    model.eval()
    with torch.no_grad():
        hidden = model.hidden_states(IDS)
        _, draft = model.mtp_draft(IDS[:, 1:], hidden[:, :-1], torch.arange(IDS.shape[1] - 1))
        return model.compute_logits(hidden), draft


@pytest.fixture(scope="module")
def adapted(base):
    model = load(base)
    names = apply_lora(model, rank=2, alpha=4.0, targets=TARGETS, mtp=True)
    assert {"model.layers.1.mlp.experts", "mtp.mlp.experts", "mtp.eh_proj", "mtp.self_attn.q_proj"} <= set(names)
    assert not any("shared_experts" in n for n in names)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = build_optimizer(model, "adamw", 1e-2)
    losses = []
    for _ in range(4):
        loss = compute_losses(model, batch(), mtp_weight=0.5)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    experts = model.model.layers[1].mlp.experts
    assert isinstance(experts, LoRAExperts) and experts.lora_B["down_proj"].abs().sum() > 0
    assert model.mtp.mlp.experts.lora_B["gate_up_proj"].abs().sum() > 0
    return model


def test_expert_factors_change_each_expert_by_its_own_low_rank_update(adapted, base):
    experts = adapted.model.layers[1].mlp.experts
    gate_up, down = experts.weights()
    original = load(base).model.layers[1].mlp.experts
    delta = (down - original.down_proj).detach()
    assert delta.shape == original.down_proj.shape
    assert all(torch.linalg.matrix_rank(delta[e]) <= 2 for e in range(delta.shape[0]))
    assert not torch.equal(gate_up, original.gate_up_proj)


def test_peft_loads_the_main_stack_and_glm45_reloads_and_merges_everything(adapted, base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = save_adapter(adapted, tmp_path / "adapter", rank=2, alpha=4.0, targets=TARGETS, base_model=str(base))
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert json.loads((adapter / "glm45_adapter.json").read_text())["mtp"]["layer"] == 3
    logits, draft = outputs(adapted)

    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, logits, atol=1e-4, rtol=1e-4)

    reloaded = load(base)
    load_adapter(reloaded, adapter)
    for got, want in zip(outputs(reloaded), (logits, draft), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    merged = merge_lora(reloaded)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    for got, want in zip(outputs(merged), (logits, draft), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    out = tmp_path / "merged"
    assert cli_main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out)]) == 0
    for got, want in zip(outputs(load(out)), (logits, draft), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_expert_lora_refuses_dropout_and_mtp_lora_needs_an_mtp_layer(base):
    with pytest.raises(ValueError, match="dropout"):
        apply_lora(load(base), rank=2, alpha=4.0, targets=("experts",), dropout=0.1)
    model = Glm4MoeForCausalLM.from_pretrained(base, dtype=torch.float32, progress=False, load_mtp=False)
    with pytest.raises(ValueError, match="no MTP layer"):
        apply_lora(model, rank=2, alpha=4.0, mtp=True)
