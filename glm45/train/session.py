"""What every training loop shares: the model (with LoRA when asked), its data-parallel wrapping, the optimizer,
loss-free balancing, one optimizer step, resumable checkpoints and the exported result.

`glm45 train` (SFT and DPO, `trainer.py`) and `glm45 rl` (GRPO, `rl.py`) differ in their data and their loss;
each builds a `TrainingSession` and calls `optimizer_step` after accumulating gradients.

Under torchrun with several ranks the session joins the process group and:
- full fine-tuning: shards parameters, gradients and optimizer state with FSDP2 (`fully_shard` per decoder
  layer and per other called module, `glm45.parallel.data_parallel`); on GPUs with a bf16 mixed-precision
  policy (parameters gathered in bf16, gradients reduced in float32). Muon orthogonalises each 2-D matrix
  whole (gathered) and each expert stack shard by shard (`optim.orthogonalise`). Checkpoints are sharded
  (`torch.distributed.checkpoint`, every rank writes its part) and the result is a whole HF checkpoint;
- LoRA: the frozen base stays whole on every rank and the adapters' gradients are averaged ("ddp").
Either way the ranks average their gradients and expert loads, so a step on N ranks with `--grad-accum A` is a
step on N·A batches.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from pathlib import Path

import torch
import torch.distributed as dist

from glm45.config import ModelConfig
from glm45.train import checkpoint as ckpt
from glm45.train.balance import RouterMonitor
from glm45.train.config import DTYPES, TrainConfig
from glm45.train.lora import apply_lora
from glm45.train.lora_io import save_adapter
from glm45.train.optim import build_optimizer, lr_factor

logger = logging.getLogger(__name__)


def load_tokenizer(path: str | Path):
    from glm45.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(path)


def read_model_config(path: str | Path) -> ModelConfig:
    """A model config JSON: an HF `config.json` (with model_type) or plain ModelConfig fields."""
    raw = json.loads(Path(path).read_text())
    if "model_type" in raw:
        return ModelConfig.from_dict(raw)
    import dataclasses

    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown model config fields {unknown}; allowed: {sorted(known)}")
    return ModelConfig(**raw)


def build_model(config: TrainConfig, tokenizer):
    from glm45.model import Glm4MoeForCausalLM

    dtype = DTYPES[config.dtype]
    if config.model is not None:
        return Glm4MoeForCausalLM.from_pretrained(config.model, dtype=dtype, progress=False)
    model_config = read_model_config(config.init_config)
    model_config.vocab_size = tokenizer.vocab_size
    model_config.eos_token_id = tokenizer.eos_token_ids
    model_config.pad_token_id = tokenizer.pad_token_id
    model_config.torch_dtype = config.dtype
    model = Glm4MoeForCausalLM(model_config)
    model.init_weights(config.init_std, torch.Generator().manual_seed(config.seed))
    return model.to(dtype)


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward instead of storing them (no weight renames)."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.model.layers:
        plain_forward = layer.forward

        def forward(x, rope, ctx=None, _plain=plain_forward):
            if not torch.is_grad_enabled():
                return _plain(x, rope, ctx)
            return checkpoint(_plain, x, rope, ctx, use_reentrant=False)

        layer.forward = forward


def join_data_parallel(model, mode: str):
    """Under torchrun with several ranks: join the process group and wrap `model` ("fsdp" or "ddp", see
    `shard_for_training`); None for a single process."""
    from glm45.distributed import init_distributed, launched_by_torchrun

    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return None
    from glm45.parallel.data_parallel import shard_for_training

    init_distributed(model.device)
    return shard_for_training(model, mode)


def sum_over_ranks(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def max_over_ranks(value: float) -> float:
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor)


def clip_gradients(params: list[torch.Tensor], max_norm: float) -> float:
    """Clip to `max_norm` (inf: only measure); the norm of all gradients together, FSDP shards included."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(norm, "full_tensor"):  # FSDP: the shards' norms combined into the whole gradient's
        norm = norm.full_tensor()
    norm = float(norm)
    if norm > max_norm:
        # Scaled one by one: torch's foreach clipping mis-scales FSDP's DTensor gradients by a plain tensor.
        scale = max_norm / (norm + 1e-6)
        for p in params:
            p.grad.mul_(scale)
    return norm


class TrainingSession:
    """The model, its parallel wrapping, optimizer and balancing, with one optimizer step and checkpoints."""

    def __init__(self, config: TrainConfig):
        config.validate()
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        self.out = Path(config.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.tokenizer_dir = config.tokenizer or config.model
        self.tokenizer = load_tokenizer(self.tokenizer_dir)
        self.model = build_model(config, self.tokenizer)
        if self.model.config.vocab_size < self.tokenizer.vocab_size:
            raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} tokens but the model only "
                             f"{self.model.config.vocab_size} embeddings")
        self.targets = [t.strip() for t in config.lora_targets.split(",") if t.strip()]
        if config.lora_rank:
            names = apply_lora(self.model, config.lora_rank, config.lora_alpha, self.targets, config.lora_dropout,
                               mtp=config.lora_mtp)
            logger.info("LoRA rank %d on %d modules", config.lora_rank, len(names))
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.parallel = join_data_parallel(self.model, "ddp" if config.lora_rank else "fsdp")
        self.rank, self.world_size = (self.parallel.rank, self.parallel.world_size) if self.parallel else (0, 1)
        self.is_main = self.rank == 0
        self.sharded = self.parallel is not None and self.parallel.mode == "fsdp"
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        logger.info("parameters: %.2fM total, %.2fM trainable%s", self.parameter_count / 1e6, trainable / 1e6,
                    f", {self.local_parameter_bytes / 2**20:.1f} MiB on this rank" if self.sharded else "")
        self.optimizer = build_optimizer(self.model, config.optimizer, config.lr, config.weight_decay,
                                         ns_dtype=config.muon_ns_dtype)
        self.monitor = RouterMonitor(self.model, config.seq_aux_weight)
        self.checkpoint_dir = self.out / "checkpoint"

    # ------------------------------------------------------------------ sizes
    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def local_parameter_bytes(self) -> int:
        """Bytes of parameters this rank holds (its FSDP shards, or the whole model)."""
        total = 0
        for p in self.model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            total += local.numel() * local.element_size()
        return total

    # ------------------------------------------------------------------ one step
    def set_lr(self, step: int) -> None:
        config = self.config
        self.optimizer.set_lr_factor(lr_factor(step, config.max_steps, config.warmup_steps, config.min_lr_ratio))

    def optimizer_step(self, sums: dict[str, float], tokens: int) -> tuple[dict[str, float], int, float]:
        """After backward: average gradients, expert loads and the logged sums over the ranks, clip, step the
        optimizer, move the balancing biases. Returns (mean sums, tokens of all ranks, gradient norm)."""
        if self.parallel is not None:
            self.parallel.reduce_gradients()
            for load in self.monitor.loads.values():  # every rank moves the biases by the loads of all ranks
                dist.all_reduce(load)
            keys = sorted(sums)
            *totals, tokens = sum_over_ranks([sums[k] for k in keys] + [tokens])
            sums = {k: total / self.world_size for k, total in zip(keys, totals, strict=True)}
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.config.clip_grad if self.config.clip_grad > 0 else math.inf
        grad_norm = clip_gradients(params, clip) if params else 0.0
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.monitor.update_biases(self.config.balance_gamma)
        return sums, int(tokens), grad_norm

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any (all ranks stop at the same step)."""
        return sum_over_ranks([float(flag)])[0] > 0 if self.parallel is not None else flag

    # ------------------------------------------------------------------ checkpoints and results
    def save_checkpoint(self, step: int, extra: dict | None = None) -> None:
        """Resumable state: sharded (every rank writes its part) under FSDP, else one file from rank 0."""
        if self.sharded:
            ckpt.save_sharded(self.checkpoint_dir, self.model, self.optimizer, step, self.config, extra)
        elif self.is_main:
            ckpt.save_checkpoint(self.checkpoint_dir, self.model, self.optimizer, step, self.config, extra)

    def load_checkpoint(self) -> tuple[int, dict] | None:
        """(step, extra state) of the checkpoint in output-dir, or None when there is none."""
        if self.sharded:
            return ckpt.load_sharded(self.checkpoint_dir, self.model, self.optimizer)
        return ckpt.load_checkpoint(self.checkpoint_dir, self.model, self.optimizer)

    def export(self, folder: Path | None = None) -> Path | None:
        """The result, in `folder` (default output-dir/model or /adapter): the whole model in the HF layout with its
        tokenizer files (FSDP shards gathered), or the LoRA adapter. Every rank takes part; rank 0 writes and gets
        the folder, the others None."""
        config = self.config
        if config.lora_rank:
            if not self.is_main:
                return None
            return save_adapter(self.model, folder or self.out / "adapter", config.lora_rank, config.lora_alpha,
                                self.targets, base_model=str(config.model), dropout=config.lora_dropout)
        result_dir = folder or self.out / "model"
        model = self.model
        if self.sharded:
            state = self.parallel.full_state_dict()  # a collective: every rank gathers
            if not self.is_main:
                return None
            model = whole_model(self.model.config, state)
        elif not self.is_main:
            return None
        model.save_pretrained(result_dir)
        ckpt.copy_tokenizer(self.tokenizer_dir, result_dir)
        return result_dir

    def close(self) -> None:
        self.monitor.remove()
        if self.parallel is not None:
            dist.barrier()
            dist.destroy_process_group()


def whole_model(model_config: ModelConfig, state: dict[str, torch.Tensor]):
    """A plain model holding `state` (gathered FSDP shards), built on the meta device without a second copy."""
    from glm45.model import Glm4MoeForCausalLM

    with torch.device("meta"):
        model = Glm4MoeForCausalLM(model_config, with_mtp=any(k.startswith("mtp.") for k in state))
    model.load_state_dict(state, assign=True)
    return model
