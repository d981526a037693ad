"""LoRA adapters on disk: PEFT's layout for what PEFT can load, a documented glm45 file for the MTP layer.

An adapter folder holds:
- `adapter_config.json` and `adapter_model.safetensors`, exactly as `peft` writes them for the transformers model,
  so `PeftModel.from_pretrained` loads them. Linear layers are `base_model.model.<module>.lora_A.weight` [r, in] /
  `lora_B.weight` [out, r] (`target_modules`). Routed experts are PEFT's `target_parameters`
  (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`): one `nn.Linear` pair per stack with the experts folded
  into the rank dim — A [E·r, in] with row e·r + j for expert e, rank j; B [out, r·E] with column j·E + e. PEFT
  nests one wrapper per stack in the module's parameter order, so with both stacks adapted `gate_up_proj`'s pair
  sits under `<experts>.base_layer.lora_A/B` and `down_proj`'s under `<experts>.lora_A/B`; with one, under
  `<experts>.lora_A/B`.
- for the MTP layer, which the transformers model (and so PEFT) does not have: `mtp_adapter.safetensors` with the
  same factor layouts under the layer's checkpoint names, `model.layers.{N}.<module>.lora_A.weight` (N =
  num_hidden_layers; experts as `model.layers.{N}.mlp.experts.<stack>.lora_A.weight`), described by
  `glm45_adapter.json` (`{"mtp": {"file", "layer", "target_modules"}}`). PEFT ignores both files.

`load_adapter` reads both parts back onto a glm45 model; `glm45 merge` then folds them into the weights.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from glm45.train.lora import EXPERT_STACKS, LoRAExperts, LoRALinear, apply_lora, lora_modules

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
GLM45_CONFIG = "glm45_adapter.json"
MTP_WEIGHTS = "mtp_adapter.safetensors"
PEFT_PREFIX = "base_model.model."


def _expert_factors(module: LoRAExperts, stack: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Our A [E, r, in], B [E, out, r] → PEFT's A [E·r, in], B [out, r·E]."""
    a, b = module.lora_A[stack].detach(), module.lora_B[stack].detach()
    num_experts, out_features, rank = b.shape
    return a.reshape(num_experts * rank, -1), b.permute(1, 2, 0).reshape(out_features, rank * num_experts)


def _set_expert_factors(module: LoRAExperts, stack: str, a: torch.Tensor, b: torch.Tensor) -> None:
    num_experts, out_features, rank = module.lora_B[stack].shape
    module.lora_A[stack].copy_(a.reshape(num_experts, rank, -1))
    module.lora_B[stack].copy_(b.reshape(out_features, rank, num_experts).permute(2, 0, 1))


def _expert_keys(name: str, stacks: Sequence[str], mtp_file: bool) -> dict[str, str]:
    """{stack: key prefix} of an experts module's factor pairs."""
    if mtp_file:
        return {stack: f"{name}.{stack}" for stack in stacks}
    if len(stacks) == 1:
        return {stacks[0]: name}
    return {"gate_up_proj": f"{name}.base_layer", "down_proj": name}


def _stored_name(name: str, num_layers: int) -> tuple[str, bool]:
    """(the name a module's factors are stored under, whether it goes to the MTP file)."""
    if name.startswith("mtp."):
        return f"model.layers.{num_layers}.{name[4:]}", True
    return PEFT_PREFIX + name, False


def adapter_state_dicts(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(PEFT's tensors for the main stack, the MTP file's tensors), under their saved names."""
    peft_state: dict[str, torch.Tensor] = {}
    mtp_state: dict[str, torch.Tensor] = {}
    for name, module in lora_modules(model).items():
        stored, in_mtp = _stored_name(name, model.config.num_hidden_layers)
        state = mtp_state if in_mtp else peft_state
        if isinstance(module, LoRALinear):
            state[f"{stored}.lora_A.weight"] = module.lora_A.weight.detach().contiguous()
            state[f"{stored}.lora_B.weight"] = module.lora_B.weight.detach().contiguous()
            continue
        for stack, prefix in _expert_keys(stored, list(module.lora_A), in_mtp).items():
            a, b = _expert_factors(module, stack)
            state[f"{prefix}.lora_A.weight"], state[f"{prefix}.lora_B.weight"] = a.contiguous(), b.contiguous()
    return peft_state, mtp_state


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA weights of the main stack under PEFT's saved names."""
    return adapter_state_dicts(model)[0]


def save_adapter(model: nn.Module, path: str | Path, rank: int, alpha: float, targets: Sequence[str],
                 base_model: str | None = None, dropout: float = 0.0) -> Path:
    from safetensors.torch import save_file

    if not lora_modules(model):
        raise ValueError("the model has no LoRA adapters to save")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    linear_targets = sorted(set(targets) - {"experts", "eh_proj"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": linear_targets,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    }
    if "experts" in targets:
        config["target_parameters"] = [f"mlp.experts.{stack}" for stack in EXPERT_STACKS]
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    peft_state, mtp_state = adapter_state_dicts(model)
    save_file(peft_state, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    extra = folder / GLM45_CONFIG
    if mtp_state:
        save_file(mtp_state, str(folder / MTP_WEIGHTS), metadata={"format": "pt"})
        mtp = {"file": MTP_WEIGHTS, "layer": model.config.num_hidden_layers, "target_modules": sorted(set(targets))}
        extra.write_text(json.dumps({"mtp": mtp}, indent=2) + "\n")
    elif extra.exists():
        extra.unlink()
    return folder


def read_adapter_config(path: str | Path) -> dict:
    config_file = Path(path) / ADAPTER_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {path}; expected a PEFT LoRA adapter folder")
    config = json.loads(config_file.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_file}: peft_type is {config.get('peft_type')!r}; only LORA adapters are supported")
    if config.get("use_dora") or config.get("use_rslora") or config.get("fan_in_fan_out"):
        raise ValueError(f"{config_file}: DoRA, rsLoRA and fan_in_fan_out adapters are not supported")
    return config


def adapter_targets(config: dict) -> list[str]:
    """Our target names for a PEFT config (`target_modules`, plus `experts` for the expert stacks)."""
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    parameters = config.get("target_parameters") or []
    if parameters:
        wanted = {f"mlp.experts.{stack}" for stack in EXPERT_STACKS}
        if set(parameters) != wanted:
            raise ValueError(f"adapter target_parameters {parameters}: only both routed-expert stacks "
                             f"{sorted(wanted)} are supported")
        targets.append("experts")
    return targets


def load_adapter(model: nn.Module, path: str | Path) -> list[str]:
    """Put the adapter saved in `path` (PEFT layout, plus the MTP file when there is one) onto `model`; returns
    the adapted module names."""
    from safetensors.torch import load_file

    folder = Path(path)
    config = read_adapter_config(folder)
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    names = apply_lora(model, rank, alpha, adapter_targets(config))
    extra = json.loads((folder / GLM45_CONFIG).read_text()) if (folder / GLM45_CONFIG).is_file() else {}
    mtp_state = {}
    if "mtp" in extra:
        if extra["mtp"]["layer"] != model.config.num_hidden_layers:
            raise ValueError(f"{folder}: the adapter's MTP layer is layer {extra['mtp']['layer']}, this model's is "
                             f"{model.config.num_hidden_layers}")
        names += apply_lora(model, rank, alpha, extra["mtp"]["target_modules"], mtp=True, main=False)
        mtp_state = load_file(str(folder / extra["mtp"]["file"]))
    state = {**load_file(str(folder / ADAPTER_WEIGHTS)), **mtp_state}
    expected = {k for part in adapter_state_dicts(model) for k in part}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(f"adapter weights do not match the model: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
    with torch.no_grad():
        for name, module in lora_modules(model).items():
            stored, in_mtp = _stored_name(name, model.config.num_hidden_layers)
            if isinstance(module, LoRALinear):
                module.lora_A.weight.copy_(state[f"{stored}.lora_A.weight"])
                module.lora_B.weight.copy_(state[f"{stored}.lora_B.weight"])
                continue
            for stack, prefix in _expert_keys(stored, list(module.lora_A), in_mtp).items():
                _set_expert_factors(module, stack, state[f"{prefix}.lora_A.weight"], state[f"{prefix}.lora_B.weight"])
    return names
