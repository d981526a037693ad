"""Which format a checkpoint is stored in, which format a model is served in, and which tensors that covers.

Served format (`--quantization`, or the checkpoint's own when not given):
- bf16 checkpoint: any of fp8, int8, int4, quantized at load tensor by tensor;
- FP8 checkpoint (compressed-tensors per-channel `weight_scale`, or 128×128 `weight_scale_inv`): kept in FP8
  with its scales (no flag needed); int8 or int4 re-quantize it at load;
- a checkpoint saved by `glm45 quantize`: served in its format; asking for another is an error;
- "none" loads every weight dequantized to the compute dtype (training a quantized checkpoint).

Quantized tensors: every linear layer's weight (attention, dense MLP, shared and routed experts, MTP's eh_proj),
and — a choice of ours, documented in the README — the LM heads too, since a decode step reads the whole head (on
an Air-shaped model a third of its bytes). The embedding tables stay in the checkpoint's dtype, as in the official
FP8 releases: a step reads one row per token, and on CPUs the table stays a view of the memory-mapped file, so only
the rows of tokens in use become resident. Routers, their correction bias, norms and biases stay in higher
precision, as in the official FP8 releases. An FP8 checkpoint keeps its bf16 heads as shipped.

The LM heads (the main model's and the MTP layer's) can be given a format of their own (`--lm-head-quantization`,
llama.cpp's `--output-tensor-type`): an int4 model with int8 heads is what Q4_K_M does with its Q6_K output
matrix. A head's rounding error goes straight into the logits, and on a real GLM-4.5 checkpoint the heads are
under 1% of the weights, so the extra bytes are cheap there; on a small model they can be a third of them.
"""

from __future__ import annotations

import json
import re

from glm45.config import QUANTIZATIONS, ModelConfig
from glm45.quant.packed import SUPER_BLOCKS

QUANTIZED_WEIGHT = re.compile(
    r"(^|\.)(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|eh_proj|lm_head|head)\.weight$"
    r"|\.mlp\.experts\.(gate_up_proj|down_proj)$")
LM_HEAD = re.compile(r"(^|\.)(lm_head|shared_head\.head)\.weight$")
GLM45_GROUP_SIZE = 32


def checkpoint_format(config: ModelConfig) -> str:
    """The weight format a checkpoint is stored in (bf16, fp32, fp8, fp8_block, int8, int4), from its
    `quantization_config` and `torch_dtype`."""
    qc = config.quantization_config
    if not qc:
        return "fp32" if config.torch_dtype == "float32" else "bf16"
    method = str(qc.get("quant_method", "")).lower()
    if method == "fp8":  # DeepSeek / vLLM style
        return "fp8_block" if qc.get("weight_block_size") else "fp8"
    if method in QUANTIZATIONS:  # glm45's own checkpoints name their format
        return method
    if method == "compressed-tensors":
        if qc.get("format") == "float-quantized" and not qc.get("config_groups"):
            return "fp8"
        for group in (qc.get("config_groups") or {}).values():
            weights = group.get("weights") or {}
            bits, kind, strategy = weights.get("num_bits"), weights.get("type"), weights.get("strategy")
            if kind == "float" and bits == 8:
                return "fp8_block" if strategy == "block" else "fp8"
            if kind == "int" and bits in (8, 4):
                return f"int{bits}"
    raise ValueError(f"quantization_config {json.dumps(qc)[:200]} is not a format glm45 reads; supported: "
                     "compressed-tensors FP8, block FP8, and glm45's own int8/int4/fp8")


def served_format(requested: str | None, config: ModelConfig) -> str | None:
    """The packed format the model is served in (None: unquantized), or a ValueError when the request
    contradicts the checkpoint."""
    stored = checkpoint_format(config)
    stored_packed = "fp8" if stored.startswith("fp8") else stored if stored in QUANTIZATIONS else None
    if requested is None:
        return stored_packed
    if requested == "none":
        return None
    if requested not in QUANTIZATIONS:
        raise ValueError(f"quantization {requested!r} is not supported; choose one of {', '.join(QUANTIZATIONS)} "
                         "or none")
    if stored in ("int8", "int4") and requested != stored:
        raise ValueError(f"the checkpoint is stored in {stored}; it cannot be served as {requested} "
                         f"(use --quantization {stored}, or quantize the original checkpoint)")
    return requested


def stored_head_format(config: ModelConfig) -> str | None:
    """The format a checkpoint saved by `glm45 quantize` keeps its LM heads in (its quantization_config's
    `"lm_head"`, "none" for the compute dtype, else its weights' format); None for any other checkpoint."""
    qc = config.quantization_config or {}
    return qc.get("lm_head", qc.get("quant_method")) if qc.get("format") == "glm45" else None


def served_head_format(requested: str | None, fmt: str | None, config: ModelConfig) -> str | None:
    """The packed format of the LM heads (None: the compute dtype) when the other weights are served in `fmt`;
    `requested` is `--lm-head-quantization` (None: as the checkpoint keeps them, else like the other weights).
    A ValueError when the request cannot be met."""
    stored = stored_head_format(config)
    if requested is None:
        return None if fmt is None else head_format(stored, fmt)
    if requested not in (*QUANTIZATIONS, "none"):
        raise ValueError(f"lm_head_quantization {requested!r} is not supported; choose one of "
                         f"{', '.join(QUANTIZATIONS)}, none")
    if fmt is None:
        raise ValueError("lm_head_quantization applies to quantized weights: give --quantization too (or serve a "
                         "quantized checkpoint)")
    if stored in ("int8", "int4") and requested not in (stored, "none"):
        raise ValueError(f"the checkpoint keeps its LM heads in {stored}; they cannot be served in {requested} "
                         f"(use --lm-head-quantization {stored} or none, or quantize the original checkpoint)")
    return head_format(requested, fmt)


def head_format(requested: str | None, fmt: str | None) -> str | None:
    """The LM heads' packed format for an `--lm-head-quantization` value: None follows the weights' `fmt`, "none"
    keeps them unpacked (None)."""
    head = fmt if requested is None else requested
    return None if head == "none" else head


def tensor_format(internal_name: str, fmt: str | None, head_fmt: str | None) -> str | None:
    """The format the model tensor `internal_name` is held packed in (None: not packed), the weights being served
    in `fmt` and the LM heads in `head_fmt`."""
    if fmt is None or QUANTIZED_WEIGHT.search(internal_name) is None:
        return None
    return head_fmt if LM_HEAD.search(internal_name) else fmt


def quantization_config(fmt: str, head_fmt: str | None = None, calibration: str | None = None) -> dict:
    """The `quantization_config` of a checkpoint `glm45 quantize` saves in `fmt` (glm45's own layout: per-row
    FP8 scales or 32-wide int8/int4 blocks, fused expert stacks, embeddings as they were), its LM heads packed in
    `head_fmt` (None: the compute dtype), its codes chosen by `calibration` (gptq; None: rounded to nearest)."""
    config = {"quant_method": fmt, "format": "glm45"}
    if calibration:
        config["calibration"] = calibration
    if fmt != "fp8":
        config["group_size"] = GLM45_GROUP_SIZE
    if fmt == "int4":
        config["super_block_groups"] = SUPER_BLOCKS  # 8-bit codes of each group's scale and minimum
    if head_fmt != fmt:
        config["lm_head"] = head_fmt or "none"
    return config


def check_packable(tensors: dict, fmt: str | None, device, head_fmt: str | None = None) -> None:
    """Before any weight is read: every tensor held packed (weights in `fmt`, LM heads in `head_fmt`) must split
    into whole blocks, and the device must run its format. `tensors` maps model names to (meta) tensors; a
    ValueError names what does not fit."""
    if fmt is None:
        return
    formats = {name: f for name in tensors if (f := tensor_format(name, fmt, head_fmt)) is not None}
    if "fp8" in formats.values() and device.type == "cuda":
        import torch

        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise ValueError(f"fp8 weights need a GPU with FP8 matrix units (compute capability 8.9 or newer); "
                             f"{torch.cuda.get_device_name(device)} is {major}.{minor}: use int8, int4 or bf16")
    bad = {name: f for name, f in formats.items()
           if f in ("int8", "int4") and tensors[name].shape[-1] % GLM45_GROUP_SIZE}
    if bad:
        packing = sorted(set(bad.values()))
        bad = [f"{name} {list(tensors[name].shape)}" for name in bad]
        raise ValueError(f"{' and '.join(packing)} pack{'s' if len(packing) == 1 else ''} blocks of {GLM45_GROUP_SIZE} "
                         f"inputs, and these tensors' input widths are not multiples of {GLM45_GROUP_SIZE}: "
                         f"{', '.join(bad[:5])}{' …' if len(bad) > 5 else ''}; "
                         "use fp8 for this model")
