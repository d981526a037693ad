"""Model modules whose weights stay quantized: linear layers and the experts' stacks.

A quantized weight is held as buffers named after the weight it replaces — `X.weight` (the codes),
`X.weight_scale`, and for int4 `X.weight_min`, `X.weight_sub_scale` and `X.weight_sub_min` — so a quantized
model's state dict is what `glm45 quantize` saves and what loading reads back. Expert stacks keep their names too
(`gate_up_proj`, `gate_up_proj_scale`, …), and `Experts` asks `expert_weight(module, name)` for either a plain
tensor or a `PackedWeight`.

Forward passes go through `glm45.kernels.cpu` on CPU (integer or widening kernels for decode-sized inputs,
dequantized blocks and fp32 GEMM for more rows), and through dequantization to the compute dtype elsewhere
(`glm45.quant.cuda` takes FP8 on GPUs). Training never sees these modules.
"""

from __future__ import annotations

import torch
from torch import nn

from glm45.kernels import cpu
from glm45.quant.packed import STORED_SUFFIXES, PackedWeight


def register_packed(module: nn.Module, name: str, packed: PackedWeight) -> None:
    """Hold `packed` on `module` as buffers `name`, `name_scale` (and int4's others, see STORED_SUFFIXES), replacing a
    parameter."""
    if name in module._parameters:
        del module._parameters[name]
    for field, tensor in packed.tensors().items():
        module.register_buffer(name + STORED_SUFFIXES[field], tensor)
    formats = dict(getattr(module, "_packed_formats", {}))
    formats[name] = (packed.format, packed.block)
    module._packed_formats = formats


def expert_weight(module: nn.Module, name: str) -> torch.Tensor | PackedWeight:
    """The weight `name` of a module: a plain tensor, or a `PackedWeight` over its buffers."""
    formats = getattr(module, "_packed_formats", None)
    if not formats or name not in formats:
        return getattr(module, name)
    fmt, block = formats[name]
    tensors = {field: getattr(module, name + suffix, None) for field, suffix in STORED_SUFFIXES.items()}
    return PackedWeight(fmt, block=block, **tensors)


class QuantLinear(nn.Module):
    """A linear layer (no autograd) over a packed weight; the bias, if any, stays in the compute dtype."""

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = packed.shape
        register_packed(self, "weight", packed)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @property
    def packed(self) -> PackedWeight:
        return expert_weight(self, "weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            return cpu.linear(x, self.packed, self.bias)
        from glm45.quant import cuda

        return cuda.linear(x, self.packed, self.bias)

    def extra_repr(self) -> str:
        fmt, block = self._packed_formats["weight"]
        return f"in={self.in_features}, out={self.out_features}, format={fmt}" + (f", block={block}" if block else "")

