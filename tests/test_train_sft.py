"""Fine-tuning end to end on a tiny reference checkpoint: loss goes down (full and LoRA), the saved model loads in
glm45 and in transformers with equal logits, and LoRA adapters load with peft and merge to the same logits."""

import json

import pytest
import torch
from glm45_tiny.synthetic import generate, write_jsonl
from tiny_checkpoints import save_reference
from train_helpers import make_tokenizer

from glm45.cli import main as cli_main
from glm45.model import Glm4MoeForCausalLM
from glm45.train.config import TrainConfig
from glm45.train.data import collate, tokenize_conversation
from glm45.train.lora import DEFAULT_TARGETS, apply_lora, merge_lora
from glm45.train.lora_io import load_adapter, save_adapter
from glm45.train.optim import build_optimizer
from glm45.train.trainer import compute_losses, train


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny transformers-made GLM-4.5-like checkpoint with a matching small tokenizer in the same folder."""
    folder = save_reference("glm45_like", tmp_path_factory.mktemp("base"))
    tokenizer = make_tokenizer(folder)
    return folder, tokenizer


@pytest.fixture(scope="module")
def fixed_batch(base):
    _, tokenizer = base
    short = [c for c in generate(40, seed=5) if c["tools"] is None][:4]  # no tool list: short rows, fast steps
    return collate([tokenize_conversation(c, tokenizer) for c in short], tokenizer.pad_token_id)


def hf_logits(folder, ids, adapter=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        return model(ids).logits


def train_steps(model, batch, steps, lr, optimizer="muon"):
    opt = build_optimizer(model, optimizer, lr)
    losses = []
    for _ in range(steps):
        loss = compute_losses(model, batch, mtp_weight=0.0)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_full_fine_tuning_lowers_the_loss(base, fixed_batch, optimizer):
    model = Glm4MoeForCausalLM.from_pretrained(base[0], dtype=torch.float32, progress=False)
    losses = train_steps(model, fixed_batch, 5, 3e-3, optimizer)
    assert losses[-1] < losses[0] - 0.3, losses


def test_lora_lowers_the_loss_and_trains_only_adapters(base, fixed_batch):
    model = Glm4MoeForCausalLM.from_pretrained(base[0], dtype=torch.float32, progress=False)
    frozen = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    names = apply_lora(model, rank=4, alpha=8, targets=("q_proj", "v_proj", "gate_proj", "down_proj"))
    assert {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate_proj",
            "model.layers.3.mlp.shared_experts.down_proj"} <= set(names)
    assert not any(n.startswith("mtp.") for n in names)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    losses = train_steps(model, fixed_batch, 5, 1e-2)
    assert losses[-1] < losses[0] - 0.1, losses
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, frozen)


def test_saved_checkpoint_loads_in_glm45_and_transformers(base, tmp_path):
    folder, tokenizer = base
    data = write_jsonl(generate(24, seed=6), tmp_path / "data.jsonl")
    summary = train(TrainConfig(data=str(data), model=str(folder), output_dir=str(tmp_path / "run"), max_steps=3,
                                batch_tokens=4096, lr=1e-3, warmup_steps=1, eval_fraction=0.2, eval_every=3,
                                log_every=1, balance_gamma=0.01))
    result = tmp_path / "run" / "model"
    assert summary["steps"] == 3 and summary["result"] == str(result)
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (result / name).is_file(), name
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "lm" in r] == [1, 2, 3]
    assert any("eval_lm_loss" in r for r in records)
    # transformers saves no MTP layer, so only the two MoE layers of the main stack route.
    assert all(set(r["expert_load_max_over_mean"]) == {"model.layers.3.mlp.gate", "model.layers.4.mlp.gate"}
               for r in records if "lm" in r)
    trained = Glm4MoeForCausalLM.from_pretrained(result, dtype=torch.float32, progress=False).eval()
    original = Glm4MoeForCausalLM.from_pretrained(folder, dtype=torch.float32, progress=False)
    bias = trained.model.layers[3].mlp.gate.e_score_correction_bias
    assert not torch.equal(bias, original.model.layers[3].mlp.gate.e_score_correction_bias)  # balancing moved it
    ids = torch.tensor([tokenizer.encode("[gMASK]<sop><|user|>\nWeather in Oslo?<|assistant|>")])
    with torch.no_grad():
        ours = trained(ids)
    torch.testing.assert_close(ours, hf_logits(result, ids), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours, original(ids), atol=1e-3)


def test_resume_continues_from_the_checkpoint(base, tmp_path):
    folder, _ = base
    data = write_jsonl(generate(16, seed=7), tmp_path / "data.jsonl")
    common = dict(data=str(data), model=str(folder), output_dir=str(tmp_path / "run"), batch_tokens=4096,
                  eval_fraction=0.0, save_every=2, log_every=1, warmup_steps=1)
    train(TrainConfig(max_steps=2, **common))
    summary = train(TrainConfig(max_steps=4, resume=True, **common))
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 4 and steps == [1, 2, 3, 4]


def test_lora_adapter_loads_with_peft_and_merges_to_the_same_logits(base, fixed_batch, tmp_path):
    folder, tokenizer = base
    model = Glm4MoeForCausalLM.from_pretrained(folder, dtype=torch.float32, progress=False)
    apply_lora(model, rank=4, alpha=8)
    train_steps(model, fixed_batch, 3, 1e-2)
    adapter = save_adapter(model, tmp_path / "adapter", rank=4, alpha=8, targets=DEFAULT_TARGETS,
                           base_model=str(folder))
    ids = fixed_batch.input_ids[:1, :40]
    model.eval()
    with torch.no_grad():
        with_adapter = model(ids)
    torch.testing.assert_close(hf_logits(folder, ids, adapter), with_adapter, atol=1e-4, rtol=1e-4)

    reloaded = Glm4MoeForCausalLM.from_pretrained(folder, dtype=torch.float32, progress=False).eval()
    load_adapter(reloaded, adapter)
    merge_lora(reloaded)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids), with_adapter, atol=1e-5, rtol=1e-5)

    out = tmp_path / "merged"
    assert cli_main(["merge", "--base", str(folder), "--adapter", str(adapter), "--out", str(out)]) == 0
    torch.testing.assert_close(hf_logits(out, ids), with_adapter, atol=1e-4, rtol=1e-4)
    assert (out / "tokenizer.json").is_file()


def test_cli_train_with_lora_writes_a_peft_adapter(base, tmp_path):
    folder, _ = base
    data = write_jsonl(generate(12, seed=8), tmp_path / "data.jsonl")
    settings = tmp_path / "run.json"
    settings.write_text(json.dumps({"lora_rank": 2, "max_steps": 2, "lr": 5e-3}))
    code = cli_main(["train", "--config", str(settings), "--data", str(data), "--model", str(folder),
                     "--output-dir", str(tmp_path / "run"), "--eval-fraction", "0", "--max-steps", "1"])
    assert code == 0
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1]  # the flag overrides the config file


def test_bad_settings_fail_clearly(base, tmp_path):
    folder, _ = base
    with pytest.raises(ValueError, match="exactly one of --model"):
        TrainConfig(data="x.jsonl").validate()
    with pytest.raises(ValueError, match="--optimizer"):
        TrainConfig(data="x.jsonl", model=str(folder), optimizer="sgd").validate()
    assert cli_main(["train", "--data", str(tmp_path / "missing.jsonl"), "--model", str(folder),
                     "--output-dir", str(tmp_path / "run")]) == 2
    model = Glm4MoeForCausalLM.from_pretrained(folder, dtype=torch.float32, progress=False)
    with pytest.raises(ValueError, match="unknown LoRA target modules"):
        apply_lora(model, rank=2, alpha=4, targets=("routed",))
