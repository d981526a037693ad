"""Loading weights into a packed format, tensor by tensor, and putting the packed tensors into a model.

The loader (`glm45.model.loader`) packs every tensor that `scheme.tensor_format` gives a format: a weight the
checkpoint already stores in the served format (FP8 with its scale, or glm45's own int8/int4; `Checkpoint.packed`)
is taken as it is; any other is read in the compute dtype — one tensor, or one expert stack, at a time — and
quantized here (`pack`). So a
bf16 copy of the whole model never exists, and resident memory after loading is the packed size.
`install` then replaces the model's linear layers by QuantLinear or
registers packed buffers on the expert stacks.
"""

from __future__ import annotations

import torch
from torch import nn

from glm45.quant.modules import QuantLinear, register_packed
from glm45.quant.packed import PackedWeight, quantize


def pack(tensor: torch.Tensor, fmt: str, device: torch.device) -> PackedWeight:
    return quantize(tensor, fmt).map(lambda t: t.to(device))


def to_device(packed: PackedWeight, device: torch.device) -> PackedWeight:
    """A copy on `device` that owns its memory (never a view pinning a memory-mapped file)."""
    return packed.map(lambda t: t.to(device, copy=True).contiguous())


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (model.get_submodule(path) if path else model), leaf


def install(model: nn.Module, packed: dict[str, PackedWeight], state: dict[str, torch.Tensor]) -> None:
    """Swap the modules whose weights are in `packed` (internal names) for quantized ones, taking their biases
    out of `state`; the rest of `state` is then assigned by the caller."""
    for name, weight in packed.items():
        owner, leaf = _parent(model, name)
        if leaf in ("gate_up_proj", "down_proj"):  # an expert stack
            register_packed(owner, leaf, weight)
            continue
        module_name = name.removesuffix(".weight")
        parent, attribute = _parent(model, module_name)
        module = getattr(parent, attribute)
        bias = state.pop(f"{module_name}.bias", None) if getattr(module, "bias", None) is not None else None
        quantized = QuantLinear(weight, bias)
        quantized._forward_hooks = module._forward_hooks  # tensor parallelism's all-reduces stay attached
        setattr(parent, attribute, quantized)


def quantize_model(model: nn.Module, fmt: str, lm_head_quantization: str | None = None) -> nn.Module:
    """Pack an already loaded model's weights in place, the LM heads in `lm_head_quantization` (None: like the rest;
    none: left as they are) (benchmarks and tests; loading packs tensor by tensor)."""
    from glm45.quant.scheme import head_format, tensor_format

    head_fmt = head_format(lm_head_quantization, fmt)
    state = dict(model.state_dict())
    packed = {name: pack(tensor, packed_in, tensor.device) for name, tensor in state.items()
              if (packed_in := tensor_format(name, fmt, head_fmt)) is not None}
    for name in packed:
        del state[name]
    install(model, packed, state)
    return model
