"""Data parallelism for training: every rank trains on its own part of each batch, the ranks stay one model.

    parallel = shard_for_training(model, "fsdp")   # full fine-tuning: FSDP2, parameters sharded over ranks
    parallel = shard_for_training(model, "ddp")    # LoRA: base weights replicated, gradients averaged
    ...
    loss.backward()                                # as many micro-batches as you like
    parallel.reduce_gradients()                    # before clipping and optimizer.step()

Both modes average gradients over the ranks, so with equal token counts per rank a step on N halves equals a
step on the whole batch. Run under torchrun (`torchrun --nproc-per-node N -m glm45.cli train …`); gloo on
CPU, NCCL on GPUs.

- "fsdp" (what `glm45 train` uses for full fine-tuning) applies `torch.distributed.fsdp.fully_shard` (FSDP2,
  with a bf16-compute / float32-reduce mixed-precision policy on GPUs) to each decoder layer and to every other
  module that owns parameters and is *called* (embeddings, norms, heads, the MTP layer's parts), not to the
  root, because the trainer calls `hidden_states`, `compute_logits` and `mtp_hidden_states` rather than `forward`,
  and FSDP2 gathers a module's parameters in its forward hooks. Parameters become DTensors sharded on dim 0;
  gradients are reduce-scattered during backward, so `reduce_gradients` has nothing left to do.
- "ddp" (LoRA in `glm45 train`) keeps the weights whole on every rank (equal from rank 0 at the start) and
  `reduce_gradients` averages the trainable parameters' gradients with one flat all-reduce per dtype — DDP's
  arithmetic without its wrapper, whose hooks likewise only see `forward`. A parameter that got no gradient
  on some rank (an expert nobody routed to there) counts as zero there; one that got none anywhere stays None.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)

MODES = ("fsdp", "ddp")


@dataclass
class TrainingParallel:
    """What `shard_for_training` did, and the one call the training loop owes it per optimizer step."""

    model: nn.Module
    mode: str
    rank: int
    world_size: int

    def reduce_gradients(self) -> None:
        """Average the gradients over the ranks (ddp); under fsdp backward already did."""
        if self.mode != "ddp" or self.world_size == 1:
            return
        params = [p for p in self.model.parameters() if p.requires_grad]
        has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
        dist.all_reduce(has_grad)
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for param, count in zip(params, has_grad.tolist(), strict=True):
            if count > 0:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                by_dtype.setdefault(param.grad.dtype, []).append(param)
        for group in by_dtype.values():
            flat = torch.cat([p.grad.reshape(-1) for p in group])
            dist.all_reduce(flat)
            flat /= self.world_size
            offset = 0
            for param in group:
                param.grad.copy_(flat[offset:offset + param.numel()].view_as(param.grad))
                offset += param.numel()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's tensors on every rank (FSDP shards gathered), e.g. for `save_pretrained` on rank 0."""
        state = self.model.state_dict()
        return {name: t.full_tensor() if hasattr(t, "full_tensor") else t for name, t in state.items()}


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 shards one by one: each decoder layer, and the other called modules with parameters."""
    units: list[nn.Module] = [model.model.embed_tokens, *model.model.layers, model.model.norm, model.lm_head]
    mtp = getattr(model, "mtp", None)
    if mtp is not None:
        # The MTP head is applied outside the MTP forward, so the MTP parts are units of their own. Its MoE returns
        # a view, which FSDP2 warns about; the router, experts and shared expert return fresh tensors.
        mlp_parts = [mtp.mlp.gate, mtp.mlp.experts, mtp.mlp.shared_experts] if hasattr(mtp.mlp, "gate") else [mtp.mlp]
        units += [mtp.embed_tokens, mtp.enorm, mtp.hnorm, mtp.eh_proj, mtp.self_attn, *mlp_parts,
                  mtp.input_layernorm, mtp.post_attention_layernorm, mtp.shared_head.norm, mtp.shared_head.head]
    covered = {id(p) for unit in units for p in unit.parameters()}
    uncovered = [name for name, p in model.named_parameters() if id(p) not in covered]
    if uncovered:
        raise ValueError(f"fsdp: parameters outside any sharded module: {uncovered[:5]}")
    return units


def shard_for_training(model: nn.Module, mode: str, mesh=None) -> TrainingParallel:
    """Make `model` (a Glm4MoeForCausalLM, LoRA applied before for "ddp") data-parallel over the default process
    group (torchrun's world). Build the optimizer afterwards: under fsdp the parameters are new DTensors."""
    if mode not in MODES:
        raise ValueError(f"data-parallel mode {mode!r} is not supported; choose one of {list(MODES)}")
    if not dist.is_initialized():
        raise ValueError("shard_for_training needs torch.distributed initialised (run under torchrun, or call "
                         "glm45.distributed.init_distributed first)")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        device = next(model.parameters()).device
        mesh = mesh or init_device_mesh(device.type, (world_size,))
        # On GPUs: gathered parameters in bf16 for the matmuls, gradients reduced and kept in float32.
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if device.type == "cuda" else MixedPrecisionPolicy()
        for unit in fsdp_units(model):
            fully_shard(unit, mesh=mesh, mp_policy=policy)
    else:
        with torch.no_grad():  # every replica starts from rank 0's weights (LoRA inits are random)
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor, src=0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("rank %d/%d: data parallel (%s), %d trainable parameters", rank, world_size, mode, trainable)
    return TrainingParallel(model, mode, rank, world_size)
