"""Supervised fine-tuning (full or LoRA) and training from scratch: the loop behind `glm45 train`.

One loop serves all three: a model loaded from an HF folder (`--model`) or built from a model config
(`--init-config`, trained from scratch with its tokenizer from `--tokenizer`), optionally with LoRA adapters
(`--lora-rank`). Each step accumulates gradients over `--grad-accum` length-bucketed batches of
`--batch-tokens` padded tokens, clips them, steps Muon/AdamW under a warmup + cosine schedule, then moves the
routers' balancing biases (loss-free balancing). The loss is next-token cross-entropy on assistant tokens,
plus `--mtp-weight` × the MTP loss and the optional sequence balance loss.

Written to `--output-dir`: `metrics.jsonl` (one line per logged step and per evaluation), `checkpoint/`
(resumable: weights, optimizer, step; `--resume`), and at the end the model in the HF layout with its
tokenizer files — or, for LoRA, the adapter in the PEFT layout.

Under torchrun (`torchrun --nproc-per-node N -m glm45.cli train …`) the ranks are data parallel: each takes
every N-th batch of the same stream, gradients and expert loads are averaged over the ranks before clipping,
the optimizer step and the bias update, and rank 0 logs, evaluates and saves. A step on N ranks with
`--grad-accum A` is a step on N·A batches. The weights stay whole on every rank (Muon's Newton–Schulz needs
whole matrices), so the model must fit one device.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from glm45.config import ModelConfig
from glm45.train import data as train_data
from glm45.train.balance import RouterMonitor, load_imbalance
from glm45.train.checkpoint import copy_tokenizer, load_checkpoint, save_checkpoint
from glm45.train.config import DTYPES, TrainConfig
from glm45.train.lora import apply_lora, save_adapter
from glm45.train.losses import masked_cross_entropy, mtp_loss
from glm45.train.optim import build_optimizer, lr_factor

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# Building the pieces


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


def prepare_data(config: TrainConfig, tokenizer) -> tuple[list[train_data.Example], list[train_data.Example]]:
    conversations = train_data.load_conversations(config.data, config.on_error)
    if config.eval_data is not None:
        eval_conversations = train_data.load_conversations(config.eval_data, config.on_error)
    else:
        rng = random.Random(config.seed)
        rng.shuffle(conversations)
        num_eval = int(len(conversations) * config.eval_fraction)
        eval_conversations, conversations = conversations[:num_eval], conversations[num_eval:]
    train = train_data.tokenize_all(tqdm(conversations, desc="tokenize", leave=False), tokenizer, config.max_seq_len,
                                    config.on_error)
    held_out = train_data.tokenize_all(eval_conversations, tokenizer, config.max_seq_len, config.on_error)
    if not train:
        raise ValueError(f"{config.data} has no conversation with assistant tokens to train on")
    return train, held_out


def join_data_parallel(model):
    """Under torchrun with several ranks: join the process group and replicate `model` over the ranks
    (`shard_for_training` "ddp"); None for a single process."""
    from glm45.distributed import init_distributed, launched_by_torchrun

    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return None
    from glm45.parallel.data_parallel import shard_for_training

    init_distributed(torch.device("cpu"))
    return shard_for_training(model, "ddp")


# ---------------------------------------------------------------------------------------------------
# Losses


def compute_losses(model, batch: train_data.Batch, mtp_weight: float,
                   monitor: RouterMonitor | None = None) -> dict[str, torch.Tensor]:
    """{'loss': the total to minimise, 'lm': cross-entropy, 'mtp': MTP loss (when on), 'aux': balance loss}."""
    if monitor is not None:
        monitor.token_mask = batch.attention_mask
    hidden = model.hidden_states(batch.input_ids)
    lm = masked_cross_entropy(model.compute_logits, hidden, batch.labels)
    out = {"lm": lm, "loss": lm}
    if mtp_weight > 0 and model.mtp is not None:
        out["mtp"] = mtp_loss(model, hidden, batch.input_ids, batch.labels)
        out["loss"] = out["loss"] + mtp_weight * out["mtp"]
    aux = monitor.take_aux_loss() if monitor is not None else None
    if aux is not None:
        out["aux"] = aux
        out["loss"] = out["loss"] + aux
    return out


@torch.no_grad()
def evaluate_loss(model, batches: list[train_data.Batch], mtp_weight: float, monitor: RouterMonitor | None,
                  autocast: bool) -> dict[str, float]:
    """Token-weighted mean cross-entropy (and MTP loss) over fixed held-out batches."""
    model.eval()
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    context = monitor.paused() if monitor is not None else contextlib.nullcontext()
    with context, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for batch in batches:
            losses = compute_losses(model, batch, mtp_weight, None)
            for key in ("lm", "mtp"):
                if key in losses:
                    n = batch.num_loss_tokens if key == "lm" else int((batch.labels[:, 1:] != -100).sum())
                    totals[key] = totals.get(key, 0.0) + float(losses[key]) * n
                    weights[key] = weights.get(key, 0.0) + n
    model.train()
    return {f"eval_{k}_loss": totals[k] / max(1.0, weights[k]) for k in totals}


def _sum_over_ranks(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


# ---------------------------------------------------------------------------------------------------
# The loop


class _Window:
    """What is averaged over the steps between two metrics lines."""

    def __init__(self):
        self.tokens, self.start, self.steps = 0, time.perf_counter(), 0
        self.loads: dict[str, torch.Tensor] = {}
        self.losses: dict[str, float] = {}

    def add(self, losses: dict[str, float], tokens: int, loads: dict[str, torch.Tensor]) -> None:
        self.tokens += tokens
        self.steps += 1
        for name, load in loads.items():
            self.loads[name] = self.loads.get(name, 0) + load
        for key, value in losses.items():
            self.losses[key] = self.losses.get(key, 0.0) + value

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / (time.perf_counter() - self.start)


class Trainer:
    """One training run: the model (with LoRA when asked), its data, optimizer and balancing, and the loop."""

    def __init__(self, config: TrainConfig):
        config.validate()
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
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
            names = apply_lora(self.model, config.lora_rank, config.lora_alpha, self.targets, config.lora_dropout)
            logger.info("LoRA rank %d on %d linear layers", config.lora_rank, len(names))
        self.parallel = join_data_parallel(self.model)
        self.rank, self.world_size = (self.parallel.rank, self.parallel.world_size) if self.parallel else (0, 1)
        self.is_main = self.rank == 0
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        logger.info("parameters: %.2fM total, %.2fM trainable",
                    sum(p.numel() for p in self.model.parameters()) / 1e6, trainable / 1e6)

        train_examples, eval_examples = prepare_data(config, self.tokenizer)
        logger.info("data: %d training and %d held-out conversations, %d training tokens", len(train_examples),
                    len(eval_examples), sum(len(e) for e in train_examples))
        pad_id = self.tokenizer.pad_token_id
        self.eval_batches = train_data.fixed_batches(eval_examples, config.batch_tokens, pad_id) \
            if eval_examples else []
        self.optimizer = build_optimizer(self.model, config.optimizer, config.lr, config.weight_decay)
        self.monitor = RouterMonitor(self.model, config.seq_aux_weight)
        self.checkpoint_dir = self.out / "checkpoint"
        resumed = load_checkpoint(self.checkpoint_dir, self.model, self.optimizer) if config.resume else None
        self.start_step = resumed or 0
        if resumed is not None:
            logger.info("resumed from %s at step %d", self.checkpoint_dir, resumed)
        batches = train_data.length_bucketed_batches(train_examples, config.batch_tokens, pad_id, config.seed)
        self.batches = itertools.islice(batches, self.rank, None, self.world_size)  # this rank's share
        for _ in range(self.start_step * config.grad_accum):  # the same data order as an uninterrupted run
            next(self.batches)

    def step(self, step: int) -> tuple[dict[str, float], int, float]:
        """One optimizer step: (mean losses, tokens, gradient norm); the balancing biases move after it."""
        config = self.config
        self.optimizer.set_lr_factor(lr_factor(step, config.max_steps, config.warmup_steps, config.min_lr_ratio))
        sums: dict[str, float] = {}
        tokens = 0
        for _ in range(config.grad_accum):
            batch = next(self.batches)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.autocast_bf16):
                losses = compute_losses(self.model, batch, config.mtp_weight, self.monitor)
            with self.monitor.paused():  # gradient checkpointing re-runs the routers in backward
                (losses["loss"] / config.grad_accum).backward()
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach()) / config.grad_accum
            tokens += int(batch.attention_mask.sum())
        if self.parallel is not None:
            self.parallel.reduce_gradients()
            for load in self.monitor.loads.values():  # every rank moves the biases by the loads of all ranks
                dist.all_reduce(load)
            keys = sorted(sums)
            *totals, tokens = _sum_over_ranks([sums[k] for k in keys] + [tokens])
            sums = {k: total / self.world_size for k, total in zip(keys, totals, strict=True)}
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.clip_grad if config.clip_grad > 0
                                                        else math.inf))
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.monitor.update_biases(config.balance_gamma)
        return sums, int(tokens), grad_norm

    def run(self) -> dict[str, Any]:
        """Train to `max_steps` (or `max_minutes`); returns a summary (steps, losses, time, output paths)."""
        config = self.config
        metrics = (self.out / "metrics.jsonl").open("a" if config.resume else "w") if self.is_main else None
        self.model.train()
        started = time.perf_counter()
        window, last = _Window(), {}
        progress = tqdm(range(self.start_step, config.max_steps), desc="train", initial=self.start_step,
                        total=config.max_steps, disable=not self.is_main)
        step = self.start_step
        for step in progress:
            sums, tokens, grad_norm = self.step(step)
            # The bias update used this step's loads; the logged statistics use the whole logging window.
            window.add(sums, tokens, self.monitor.loads)
            self.monitor.reset()
            last = {**sums, "grad_norm": grad_norm}
            progress.set_postfix(loss=f"{sums['lm']:.3f}", tok_s=f"{window.tokens_per_s:.0f}")
            done = step + 1
            if metrics is not None and (done % config.log_every == 0 or done == config.max_steps):
                self._log_window(metrics, done, window, grad_norm, started)
                window = _Window()
            last.update(self._evaluate(metrics, done))
            if self.is_main and done % config.save_every == 0:
                save_checkpoint(self.checkpoint_dir, self.model, self.optimizer, done, config)
            if self._out_of_time(started):
                logger.warning("stopping at step %d: --max-minutes %.1f reached", done, config.max_minutes)
                break
        progress.close()
        self.monitor.remove()
        return self._finish(step + 1, started, last, metrics)

    def _log_window(self, metrics, step: int, window: _Window, grad_norm: float, started: float) -> None:
        # Losses are means over the steps since the last log line; grad_norm is this step's.
        _write(metrics, {
            "step": step, **{k: round(v / window.steps, 5) for k, v in window.losses.items()},
            "grad_norm": round(grad_norm, 4), "lr": self.optimizer.optimizers[0].param_groups[0]["lr"],
            "tokens_per_s": round(window.tokens_per_s, 1), "elapsed_s": round(time.perf_counter() - started, 1),
            "expert_load_max_over_mean": {k: round(v, 3) for k, v in load_imbalance(window.loads).items()}})

    def _evaluate(self, metrics, step: int) -> dict[str, float]:
        config = self.config
        if not (self.is_main and self.eval_batches and (step % config.eval_every == 0 or step == config.max_steps)):
            return {}
        scores = evaluate_loss(self.model, self.eval_batches, config.mtp_weight, self.monitor, config.autocast_bf16)
        _write(metrics, {"step": step, **{k: round(v, 5) for k, v in scores.items()}})
        logger.info("step %d: %s", step, scores)
        return scores

    def _out_of_time(self, started: float) -> bool:
        limit = self.config.max_minutes
        out_of_time = bool(limit and time.perf_counter() - started > limit * 60)
        if self.parallel is not None:  # all ranks stop at the same step
            out_of_time = _sum_over_ranks([float(out_of_time)])[0] > 0
        return out_of_time

    def _finish(self, final_step: int, started: float, last: dict[str, float], metrics) -> dict[str, Any]:
        config = self.config
        if not self.is_main:
            dist.barrier()  # rank 0 saves
            dist.destroy_process_group()
            return {"steps": final_step, "rank": self.rank, **last}
        metrics.close()
        save_checkpoint(self.checkpoint_dir, self.model, self.optimizer, final_step, config)
        if config.lora_rank:
            result_dir = save_adapter(self.model, self.out / "adapter", config.lora_rank, config.lora_alpha,
                                      self.targets, base_model=str(config.model), dropout=config.lora_dropout)
        else:
            result_dir = self.out / "model"
            self.model.save_pretrained(result_dir)
            copy_tokenizer(self.tokenizer_dir, result_dir)
        summary = {"steps": final_step, "train_minutes": round((time.perf_counter() - started) / 60, 2),
                   "result": str(result_dir), **last}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if self.parallel is not None:
            dist.barrier()
            dist.destroy_process_group()
        return summary


def train(config: TrainConfig) -> dict[str, Any]:
    """Run training; returns a summary (steps, losses, time, expert loads, output paths)."""
    return Trainer(config).run()


def _write(handle, record: dict[str, Any]) -> None:
    handle.write(json.dumps(record) + "\n")
    handle.flush()
