"""LoRA adapters in the PEFT layout, and merging them into the base weights.

LoRA trains a low-rank update next to a frozen linear layer: y = W x + b + (α/r) · B (A x), with A [r, in]
initialised like PEFT (Kaiming-uniform) and B [out, r] at zero, so training starts from the base model.
Adapters are saved exactly as `peft` saves them — `adapter_config.json` plus `adapter_model.safetensors`
with keys `base_model.model.<module>.lora_A.weight` / `lora_B.weight` — so `PeftModel.from_pretrained`
loads them onto the transformers model, and `merge_lora` folds them into an ordinary checkpoint.

Our module names mirror the Hugging Face ones (`model.layers.{i}.self_attn.q_proj`, ...). Only linear
layers of the main stack are adapted: attention projections (the default) and, on request, dense MLPs and
shared experts. The routed experts are stacked tensors, not linear layers, and the MTP layer is not part of
the HF model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ALLOWED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Attention only by default: with transformers 5, peft also maps the names gate_proj/up_proj/down_proj onto the
# fused routed-expert tensors, which we do not adapt, so MLP adapters load in peft with extra, random branches.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class LoRALinear(nn.Linear):
    """An nn.Linear (same `weight`/`bias` names) with a LoRA branch `lora_A`, `lora_B`."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device=base.weight.device, dtype=base.weight.dtype)
        self.base_class = type(base)  # merged back into the same kind of linear layer
        self.weight = base.weight
        self.bias = base.bias
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        update = self.lora_B(self.lora_A(self.dropout(x).to(self.lora_A.weight.dtype)))
        return out + (update * self.scaling).to(out.dtype)

    def merged(self) -> nn.Linear:
        """The original kind of linear layer with W + (α/r)·B·A."""
        linear = self.base_class(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling
            linear.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


def _adaptable(model: nn.Module, targets: Sequence[str]) -> list[str]:
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not isinstance(module, LoRALinear)
            and name.split(".")[-1] in targets and not name.startswith("mtp.")]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: Sequence[str] = DEFAULT_TARGETS,
               dropout: float = 0.0) -> list[str]:
    """Freeze the model and put LoRA branches on its target linear layers; returns their names."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank}")
    unknown = [t for t in targets if t not in ALLOWED_TARGETS]
    if unknown:
        raise ValueError(f"unknown LoRA target modules {unknown}; allowed: {', '.join(ALLOWED_TARGETS)}")
    names = _adaptable(model, targets)
    if not names:
        raise ValueError(f"the model has no linear layers named {list(targets)} to adapt")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        _set_module(model, name, LoRALinear(model.get_submodule(name), rank, alpha, dropout))
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA weights under PEFT's saved names."""
    state = {}
    for name, module in lora_modules(model).items():
        state[f"base_model.model.{name}.lora_A.weight"] = module.lora_A.weight.detach().contiguous()
        state[f"base_model.model.{name}.lora_B.weight"] = module.lora_B.weight.detach().contiguous()
    return state


def save_adapter(model: nn.Module, path: str | Path, rank: int, alpha: float, targets: Sequence[str],
                 base_model: str | None = None, dropout: float = 0.0) -> Path:
    from safetensors.torch import save_file

    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA adapters to save")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": sorted(set(targets)),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    }
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_file(adapter_state_dict(model), str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
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


def load_adapter(model: nn.Module, path: str | Path) -> list[str]:
    """Put the adapter saved in `path` (PEFT layout) onto `model`; returns the adapted module names."""
    from safetensors.torch import load_file

    config = read_adapter_config(path)
    targets = config["target_modules"]
    if isinstance(targets, str):
        targets = [targets]
    names = apply_lora(model, int(config["r"]), float(config["lora_alpha"]), targets)
    state = load_file(str(Path(path) / ADAPTER_WEIGHTS))
    expected = set(adapter_state_dict(model))
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(f"adapter weights do not match the model: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
    with torch.no_grad():
        for name, module in lora_modules(model).items():
            module.lora_A.weight.copy_(state[f"base_model.model.{name}.lora_A.weight"])
            module.lora_B.weight.copy_(state[f"base_model.model.{name}.lora_B.weight"])
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA branch into its linear layer (in place) and make all parameters trainable again."""
    for name, module in lora_modules(model).items():
        _set_module(model, name, module.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model
