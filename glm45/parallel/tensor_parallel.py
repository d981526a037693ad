"""Tensor parallelism for `Glm4MoeForCausalLM`, applied from outside: the model code stays single-device.

`parallelize_model(model, group)` cuts a model (on the meta device before loading, or a real one) to one
rank's shard and returns the `ShardSpec` of every parameter it cut, which the loader uses to read only that
shard from the checkpoint. Megatron-style splits:

    attention    q/k/v: column-parallel by heads (bias too); o_proj: row-parallel, then all-reduce.
                 KV heads are split when there are at least as many as ranks, else replicated: each rank
                 keeps the one KV head its query heads attend with.
    dense MLP    gate/up: column-parallel; down: row-parallel, then all-reduce.
    MoE          shared expert as the dense MLP; routed experts either cut inside each expert along the
                 intermediate dimension (default) or partitioned whole across ranks (`expert_parallel`,
                 see expert_parallel.py). The router stays replicated, so routing is the single-device
                 routing. The routed and shared partial sums are added first: one all-reduce per MoE block.
    vocabulary   embeddings split by rows (each rank looks up its ids, zeros elsewhere, all-reduce); the head
                 split by rows too (each rank computes its slice of the logits, all-gather); a vocabulary
                 the ranks do not divide is padded with zero rows.
    replicated   norms (QK-norm included), routers and their balancing bias, MTP's eh_proj.

Activations between blocks are replicated, so there is one all-reduce per attention and one per feed-forward.
The all-reduces are forward hooks on the modules whose outputs are partial sums; this is an inference
scheme (training shards with FSDP2 or DDP, see data_parallel.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from glm45.config import ModelConfig
from glm45.distributed import ParallelGroup
from glm45.model.moe import MoE
from glm45.model.shard import ShardSpec
from glm45.parallel.expert_parallel import partition_experts

logger = logging.getLogger(__name__)


class VocabParallelEmbedding(nn.Module):
    """Rows [vocab_start, vocab_start + num_embeddings) of an embedding table; the sum over ranks is the lookup.
    A vocabulary the ranks do not divide is padded with zero rows at its end (ids never reach them)."""

    def __init__(self, embedding: nn.Embedding, group: ParallelGroup):
        super().__init__()
        self.group = group
        self.shard = ShardSpec(dim=0, num_shards=group.size, index=group.rank, pad=True)
        self.num_embeddings = self.shard.piece_length(embedding.num_embeddings)
        self.vocab_start = group.rank * self.num_embeddings
        self.embedding_dim = embedding.embedding_dim
        self.weight = _cut(embedding.weight, self.shard)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local_ids = input_ids - self.vocab_start
        elsewhere = (local_ids < 0) | (local_ids >= self.num_embeddings)
        out = F.embedding(local_ids.masked_fill(elsewhere, 0), self.weight)
        return self.group.all_reduce(out.masked_fill(elsewhere[..., None], 0.0))

    def extra_repr(self) -> str:
        return f"rows {self.vocab_start}…{self.vocab_start + self.num_embeddings - 1}, dim {self.embedding_dim}"


class VocabParallelHead(nn.Module):
    """Rows of the output projection; each rank computes its slice of the logits, gathered in rank order
    (and cut back to the vocabulary when it was padded to a multiple of the ranks)."""

    def __init__(self, head: nn.Linear, group: ParallelGroup):
        super().__init__()
        if head.bias is not None:
            raise ValueError("a vocabulary-parallel head has no bias (GLM-4.5's heads have none)")
        self.group = group
        self.vocab_size = head.out_features
        self.shard = ShardSpec(dim=0, num_shards=group.size, index=group.rank, pad=True)
        self.weight = _cut(head.weight, self.shard)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.group.all_gather(F.linear(hidden, self.weight), dim=-1)[..., : self.vocab_size]


def _cut(param: nn.Parameter, shard: ShardSpec) -> nn.Parameter:
    """This rank's piece of a parameter as a parameter of its own (meta stays meta; real data is copied so
    that the full tensor can be freed)."""
    return nn.Parameter(shard.slice(param.detach()).clone(), requires_grad=param.requires_grad)


def _all_reduce_hook(group: ParallelGroup) -> Callable:
    def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        return group.all_reduce(output)

    return hook


def allowed_sizes(config: ModelConfig, expert_parallel: bool, limit: int = 64) -> list[int]:
    """Tensor-parallel sizes (up to `limit`) that split every dimension of this model evenly."""
    return [n for n in range(1, limit + 1) if not unsplittable_fields(config, n, expert_parallel)]


def unsplittable_fields(config: ModelConfig, size: int, expert_parallel: bool) -> list[str]:
    """The config fields that `size` ranks cannot split evenly."""
    problems = []
    kv = config.num_key_value_heads
    checks = {
        "num_attention_heads": config.num_attention_heads,
        "intermediate_size": config.intermediate_size,
        "moe_intermediate_size × n_shared_experts": config.moe_intermediate_size * config.n_shared_experts,
        ("n_routed_experts" if expert_parallel else "moe_intermediate_size"):
            config.n_routed_experts if expert_parallel else config.moe_intermediate_size,
    }
    for name, value in checks.items():
        if value % size:
            problems.append(f"{name} ({value})")
    if kv % size and size % kv:
        problems.append(f"num_key_value_heads ({kv}: must divide or be divisible by the size)")
    return problems


def parallelize_model(model: nn.Module, group: ParallelGroup, expert_parallel: bool = False) -> dict[str, ShardSpec]:
    """Cut `model` (a Glm4MoeForCausalLM) to this rank's shard in place; returns {parameter name: ShardSpec}."""
    if group.size == 1:
        return {}
    config: ModelConfig = model.config
    problems = unsplittable_fields(config, group.size, expert_parallel)
    if problems:
        raise ValueError(
            f"tensor_parallel_size={group.size} does not evenly split {', '.join(problems)} of this model; "
            f"allowed sizes: {allowed_sizes(config, expert_parallel)}"
        )
    plan: dict[str, ShardSpec] = {}
    model.model.embed_tokens = VocabParallelEmbedding(model.model.embed_tokens, group)
    plan["model.embed_tokens.weight"] = model.model.embed_tokens.shard
    for index, layer in enumerate(model.model.layers):
        _parallelize_block(layer, f"model.layers.{index}", group, expert_parallel, plan)
    model.lm_head = VocabParallelHead(model.lm_head, group)
    plan["lm_head.weight"] = model.lm_head.shard
    mtp = getattr(model, "mtp", None)
    if mtp is not None:
        _parallelize_block(mtp, "mtp", group, expert_parallel, plan)
        mtp.embed_tokens = VocabParallelEmbedding(mtp.embed_tokens, group)
        plan["mtp.embed_tokens.weight"] = mtp.embed_tokens.shard
        mtp.shared_head.head = VocabParallelHead(mtp.shared_head.head, group)
        plan["mtp.shared_head.head.weight"] = mtp.shared_head.head.shard
    logger.info("rank %d/%d: %d tensors sharded%s", group.rank, group.size, len(plan),
                ", experts partitioned" if expert_parallel else "")
    return plan


def _parallelize_block(block: nn.Module, prefix: str, group: ParallelGroup, expert_parallel: bool,
                       plan: dict[str, ShardSpec]) -> None:
    _parallelize_attention(block.self_attn, f"{prefix}.self_attn", group, plan)
    mlp = block.mlp
    if isinstance(mlp, MoE):
        _parallelize_mlp(mlp.shared_experts, f"{prefix}.mlp.shared_experts", group, plan)
        experts_prefix = f"{prefix}.mlp.experts"
        if expert_parallel:
            mlp.experts, specs = partition_experts(mlp.experts, group)
            plan.update({f"{experts_prefix}.{name}": spec for name, spec in specs.items()})
        else:
            experts = mlp.experts
            gate_up = ShardSpec(dim=1, num_shards=group.size, index=group.rank, parts=2)  # gate rows, then up rows
            down = ShardSpec(dim=2, num_shards=group.size, index=group.rank)
            experts.gate_up_proj = _cut(experts.gate_up_proj, gate_up)
            experts.down_proj = _cut(experts.down_proj, down)
            experts.intermediate_size //= group.size
            plan[f"{experts_prefix}.gate_up_proj"] = gate_up
            plan[f"{experts_prefix}.down_proj"] = down
    else:
        _parallelize_mlp(mlp, f"{prefix}.mlp", group, plan)
    # The routed and shared outputs (or the dense MLP's) are partial sums over ranks.
    mlp.register_forward_hook(_all_reduce_hook(group))


def _parallelize_attention(attn: nn.Module, prefix: str, group: ParallelGroup, plan: dict[str, ShardSpec]) -> None:
    size, rank = group.size, group.rank
    heads = ShardSpec(dim=0, num_shards=size, index=rank)
    if attn.num_kv_heads >= size:
        kv_heads, num_local_kv = heads, attn.num_kv_heads // size
    else:
        # Fewer KV heads than ranks: every size/num_kv_heads consecutive ranks share (replicate) one KV head,
        # the one that their query heads (a contiguous run inside one GQA group) attend with.
        ranks_per_kv_head = size // attn.num_kv_heads
        kv_heads, num_local_kv = ShardSpec(dim=0, num_shards=attn.num_kv_heads, index=rank // ranks_per_kv_head), 1
    for name, spec in (("q_proj", heads), ("k_proj", kv_heads), ("v_proj", kv_heads)):
        _shard_linear(getattr(attn, name), spec, f"{prefix}.{name}", plan)
    _shard_linear(attn.o_proj, ShardSpec(dim=1, num_shards=size, index=rank), f"{prefix}.o_proj", plan)
    attn.num_heads //= size
    attn.num_kv_heads = num_local_kv
    attn.o_proj.register_forward_hook(_all_reduce_hook(group))


def _parallelize_mlp(mlp: nn.Module, prefix: str, group: ParallelGroup, plan: dict[str, ShardSpec]) -> None:
    columns = ShardSpec(dim=0, num_shards=group.size, index=group.rank)
    _shard_linear(mlp.gate_proj, columns, f"{prefix}.gate_proj", plan)
    _shard_linear(mlp.up_proj, columns, f"{prefix}.up_proj", plan)
    _shard_linear(mlp.down_proj, ShardSpec(dim=1, num_shards=group.size, index=group.rank), f"{prefix}.down_proj",
                  plan)


def _shard_linear(linear: nn.Linear, spec: ShardSpec, prefix: str, plan: dict[str, ShardSpec]) -> None:
    """Column-parallel (spec.dim 0: output features, bias with them) or row-parallel (spec.dim 1: input
    features; the bias would be added once per rank, so there must be none)."""
    linear.weight = _cut(linear.weight, spec)
    plan[f"{prefix}.weight"] = spec
    if linear.bias is not None:
        if spec.dim != 0:
            raise ValueError(f"{prefix} is row-parallel and cannot have a bias")
        linear.bias = _cut(linear.bias, spec)
        plan[f"{prefix}.bias"] = spec
    linear.out_features, linear.in_features = linear.weight.shape
