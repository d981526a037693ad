"""State-dict naming: the model's parameter names ↔ the names checkpoints store them under.

`{}` = layer index, `{e}` = expert:
    mtp.X                                ↔ model.layers.{num_hidden_layers}.X
    model.layers.{}.mlp.experts.gate_up_proj [E, 2I, D]
                                         ↔ model.layers.{}.mlp.experts.{e}.gate_proj.weight [I, D]
                                           + model.layers.{}.mlp.experts.{e}.up_proj.weight [I, D]
    model.layers.{}.mlp.experts.down_proj [E, D, I]
                                         ↔ model.layers.{}.mlp.experts.{e}.down_proj.weight [D, I]
Checkpoints carry either per-expert tensors (the released layout) or the fused stacks (transformers 5).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from glm45.config import ModelConfig
from glm45.model.checkpoint import SCALE_SUFFIXES, Checkpoint
from glm45.model.shard import ShardSpec

# Tensors some checkpoints carry that have no place in the model: activation scales (activations are
# quantised dynamically, if at all) and precomputed RoPE frequencies.
IGNORABLE = re.compile(r".*\.(input_scale|rotary_emb\.inv_freq)$")
# Parameters the reference keeps in float32 whatever the model dtype.
FLOAT32_PARAMS = re.compile(r".*\.mlp\.gate\.(weight|e_score_correction_bias)$")
EXPERT_STACK = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<kind>gate_up_proj|down_proj)$")


def checkpoint_name(internal: str, config: ModelConfig) -> str:
    """The stored name of a model parameter (the MTP layer is stored as the layer after the last)."""
    return f"model.layers.{config.num_hidden_layers}." + internal[4:] if internal.startswith("mtp.") else internal


def has_mtp_tensors(checkpoint: Checkpoint, config: ModelConfig) -> bool:
    prefix = f"model.layers.{config.num_hidden_layers}."
    return any(name.startswith(prefix) for name in checkpoint.names())


def is_skipped_mtp(name: str, config: ModelConfig, with_mtp: bool) -> bool:
    """MTP tensors are left out on purpose when the caller did not ask for them, and layers past the first
    MTP layer (checkpoints with several) are not used."""
    match = re.match(r"model\.layers\.(\d+)\.", name)
    if not match:
        return False
    layer = int(match.group(1))
    if layer == config.num_hidden_layers:
        return not with_mtp
    return config.num_hidden_layers < layer < config.num_hidden_layers + config.num_nextn_predict_layers


def stack_experts(checkpoint: Checkpoint, prefix: str, kind: str, meta: torch.Tensor, dtype: torch.dtype,
                   shard: ShardSpec | None = None):
    """Build a fused expert stack (or one rank's shard of it) from per-expert tensors.

    A shard along dim 0 (expert parallelism) reads only this rank's experts; a shard along dim 1 or 2 (tensor
    parallelism inside each expert) cuts every expert's gate/up rows or down columns. The tensors of the
    experts other ranks hold are counted as consumed, not as unexpected."""
    full_shape = shard.full_shape(meta.shape) if shard else list(meta.shape)
    num_experts = full_shape[0]
    parts = ("gate_proj", "up_proj") if kind == "gate_up_proj" else ("down_proj",)
    problems: dict[str, list[str]] = {"missing": [], "wrong_shape": []}
    part_shape = [full_shape[1] // len(parts), full_shape[2]]
    experts = range(num_experts)
    part_shard = None
    if shard is not None and shard.dim == 0:
        (first, count), = shard.ranges(num_experts)
        experts = range(first, first + count)
    elif shard is not None:
        part_shard = ShardSpec(shard.dim - 1, shard.num_shards, shard.index)
    names = [f"{prefix}.{e}.{part}.weight" for e in experts for part in parts]
    for name in names:
        if name not in checkpoint:
            problems["missing"].append(name)
        elif checkpoint.shape(name) != part_shape:
            problems["wrong_shape"].append(f"{name} is {checkpoint.shape(name)}, expected {part_shape}")
    if problems["missing"] or problems["wrong_shape"]:
        return None, [], problems
    stacked = torch.empty(list(meta.shape), dtype=dtype)
    local_rows = meta.shape[1] // len(parts)
    consumed = []
    for i, name in enumerate(names):
        expert, part_index = divmod(i, len(parts))
        rows = slice(part_index * local_rows, (part_index + 1) * local_rows)
        tensor, used = checkpoint.weight(name, dtype, part_shard)
        stacked[expert, rows] = tensor
        consumed += used
    others = [f"{prefix}.{e}.{part}.weight{suffix}" for e in range(num_experts) if e not in experts
              for part in parts for suffix in ("", *SCALE_SUFFIXES)]
    consumed += [name for name in others if name in checkpoint]
    return stacked, consumed, problems


def checkpoint_tensors(model) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's tensors under their released checkpoint names (per-expert, MTP as the last layer). Packed
    expert stacks (a quantized model) stay fused, beside their `_scale` (and `_min`) tensors."""
    config: ModelConfig = model.config
    state = model.state_dict()
    for internal, tensor in state.items():
        name = checkpoint_name(internal, config)
        stack = EXPERT_STACK.match(name)
        if not stack or internal + "_scale" in state:
            yield name, tensor
            continue
        parts = ("gate_proj", "up_proj") if stack["kind"] == "gate_up_proj" else ("down_proj",)
        for expert in range(tensor.shape[0]):
            for part, piece in zip(parts, tensor[expert].chunk(len(parts), dim=0), strict=True):
                yield f"{stack['prefix']}.{expert}.{part}.weight", piece
