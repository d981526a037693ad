"""GPTQ calibration of a checkpoint (`glm45 quantize --calibration`), one layer at a time: the model is loaded packed
(rounded to nearest), then each part — every decoder layer in order, the LM head, the MTP layer — is read from the
checkpoint unpacked, run over the calibration records to gather its Hessians, and its weights packed again with
GPTQ's codes (`gptq.quantize_calibrated`) in place of the rounded ones.

A weight's Hessian is H = Σ x xᵀ over the inputs that reach it: for a linear layer, the inputs of its forward; for a
routed expert, the tokens routed to it and the SwiGLU product they give its down projection (one [E, K, K] stack per
expert weight); for the MTP layer, its forward over the same text. The hidden states go from part to part through
the unpacked weights, so every Hessian is what one float forward of the whole model would give. At any time the
process holds the packed model, one part unpacked in the compute dtype with its K×K float32 Hessians (per expert for
the stacks: for GLM-4.5-Air's 128 experts, about 9 GiB), and the calibration records' hidden states.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from glm45.model import Glm4MoeForCausalLM
from glm45.model.loader import MTP_COPIES, FloatReader
from glm45.model.moe import Experts
from glm45.quant.gptq import quantize_calibrated
from glm45.quant.loading import install
from glm45.quant.modules import expert_weight
from glm45.quant.packed import PackedWeight
from glm45.quant.scheme import QUANTIZED_WEIGHT, head_format, tensor_format


def gram(rows: list[torch.Tensor]) -> torch.Tensor:
    """Σ x xᵀ over the rows of every tensor in `rows` (float32): a head's Hessian from its inputs, without running
    the head."""
    total = None
    for x in rows:
        x = x.reshape(-1, x.shape[-1]).float()
        total = x.T @ x if total is None else total.addmm_(x.T, x)
    return total


@contextmanager
def recording(module: nn.Module, prefix: str) -> Iterator[dict[str, torch.Tensor]]:
    """{weight name: Σ x xᵀ} of the inputs of `module`'s quantized linear layers and expert stacks while the block
    runs; names are `prefix`-qualified model names."""
    sums: dict[str, torch.Tensor] = {}

    def add(name: str, x: torch.Tensor, expert: int | None = None, experts: int = 0) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if expert is None:
            sums[name] = sums[name].addmm_(x.T, x) if name in sums else x.T @ x
        else:
            if name not in sums:
                sums[name] = torch.zeros(experts, x.shape[-1], x.shape[-1], device=x.device)
            sums[name][expert].addmm_(x.T, x)

    def expert_inputs(name: str, module: Experts, args) -> None:
        x, _, ids = args
        gate_up_proj, _ = module.weights()
        for expert in range(module.num_experts):
            rows = (ids == expert).any(-1)
            if not rows.any():
                continue
            routed = x[rows]
            gate, up = (routed @ gate_up_proj[expert].T).chunk(2, dim=-1)
            add(f"{name}.gate_up_proj", routed, expert, module.num_experts)
            add(f"{name}.down_proj", F.silu(gate) * up, expert, module.num_experts)

    hooks = []
    for local, child in module.named_modules():
        name = ".".join(filter(None, (prefix, local)))
        if isinstance(child, nn.Linear) and QUANTIZED_WEIGHT.search(f"{name}.weight"):
            hooks.append(child.register_forward_pre_hook(lambda m, args, key=f"{name}.weight": add(key, args[0])))
        elif isinstance(child, Experts):
            hooks.append(child.register_forward_pre_hook(lambda m, args, key=name: expert_inputs(key, m, args)))
    try:
        yield sums
    finally:
        for hook in hooks:
            hook.remove()


class _Unpacked:
    """The model's parts unpacked one at a time: a meta-device copy of the model whose part `prefix` is given the
    checkpoint's tensors while it is in use."""

    def __init__(self, model: Glm4MoeForCausalLM, path: str | Path):
        with torch.device("meta"):
            self.shell = Glm4MoeForCausalLM(model.config, with_mtp=model.mtp is not None)
        self.metas = self.shell.state_dict()
        self.reader = FloatReader(path, model.config, model.dtype, model.device)

    def load(self, prefix: str, shared: dict[str, torch.Tensor]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        """(the part as a module holding the checkpoint's tensors, the tensors read); an MTP copy the checkpoint
        leaves out is the main model's tensor from `shared`."""
        names = {n: m for n, m in self.metas.items() if n.startswith(prefix + ".")}
        tensors = self.reader.read(names)
        module = self.shell.get_submodule(prefix)
        given = {n: tensors[n] if n in tensors else shared[MTP_COPIES[n]] for n in names}
        module.load_state_dict({n.removeprefix(prefix + "."): t for n, t in given.items()}, assign=True)
        return module, tensors

    def release(self, prefix: str) -> None:
        self.shell.get_submodule(prefix).to("meta")
        self.reader.release_pages()


@torch.no_grad()
def part_hessians(model: Glm4MoeForCausalLM, path: str | Path, records) -> Iterator[tuple[dict, dict]]:
    """(the part's tensors as read, their Hessians) for each decoder layer in order, then the LM head, then the MTP
    layer, over the records' token ids."""
    parts = _Unpacked(model, path)
    device, dtype = model.device, model.dtype
    ids = [torch.tensor([r.input_ids], device=device) for r in records]
    hidden = [model.model.embed_tokens(t) for t in ids]
    ropes = [model.rope(torch.arange(t.shape[1], device=device), dtype) for t in ids]
    for i in range(model.config.num_hidden_layers):
        prefix = f"model.layers.{i}"
        layer, tensors = parts.load(prefix, {})
        with recording(layer, prefix) as sums:
            hidden = [layer(x, rope, None) for x, rope in zip(hidden, ropes, strict=True)]
        parts.release(prefix)
        yield tensors, sums
    normed = [model.model.norm(x) for x in hidden]
    _, main_head = parts.load("lm_head", {})
    yield main_head, {"lm_head.weight": gram(normed)}
    parts.release("lm_head")
    if model.mtp is None:
        return
    mtp, tensors = parts.load("mtp", {**main_head, "model.embed_tokens.weight": model.model.embed_tokens.weight})
    with recording(mtp, "mtp") as sums:
        drafted = [mtp(t[:, 1:], x[:, :-1], model.rope(torch.arange(t.shape[1] - 1, device=device), dtype), None)
                   for t, x in zip(ids, normed, strict=True) if t.shape[1] >= 2]
    sums["mtp.shared_head.head.weight"] = gram(drafted)
    parts.release("mtp")
    yield tensors, sums


def calibrate(path: str | Path, fmt: str, lm_head_quantization: str | None, records, dtype="auto"):
    """The checkpoint at `path` loaded with its int8/int4 weights (`fmt`; the LM heads in `lm_head_quantization`)
    given GPTQ's codes for the calibration records."""
    model = Glm4MoeForCausalLM.from_pretrained(path, dtype=dtype, quantization=fmt,
                                               lm_head_quantization=lm_head_quantization)
    head_fmt = head_format(lm_head_quantization, fmt)
    for tensors, hessians in part_hessians(model, path, records):
        packed = {name: quantize_calibrated(tensors[name], packed_in, hessians.get(name), _held(model, name, packed_in))
                  for name in tensors if (packed_in := tensor_format(name, fmt, head_fmt)) in ("int8", "int4")}
        biases = {name: t for name, t in tensors.items()
                  if name.endswith(".bias") and name.removesuffix(".bias") + ".weight" in packed}
        install(model, packed, biases)
    return model


def _held(model: nn.Module, name: str, fmt: str) -> PackedWeight | None:
    """The weight `name` as the model holds it (loaded rounded to nearest), if it is packed in `fmt`."""
    owner, _, leaf = name.rpartition(".")
    held = expert_weight(model.get_submodule(owner), leaf)
    return held if isinstance(held, PackedWeight) and held.format == fmt else None
