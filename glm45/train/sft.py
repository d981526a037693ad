"""Supervised fine-tuning (full or LoRA) and training from scratch: the loop behind `glm45 train`.

One loop serves all three: a model loaded from an HF folder (`--model`) or built from a model config
(`--init-config`, trained from scratch with its tokenizer from `--tokenizer`), optionally with LoRA adapters
(`--lora-rank`). Each step accumulates gradients over `--grad-accum` length-bucketed batches of
`--batch-tokens` padded tokens, clips them, steps Muon/AdamW under a warmup + cosine schedule, then moves the
routers' balancing biases (loss-free balancing). The loss is next-token cross-entropy on assistant tokens,
plus `--mtp-weight` × the MTP loss and the optional sequence balance loss.

Written to `--output-dir`: `metrics.jsonl` (one line per logged step and per evaluation; `glm45.train.plot`
draws it), `checkpoint/` (resumable: weights, optimizer, step; `--resume`), and at the end the model in the
HF layout with its tokenizer files — or, for LoRA, the adapter in the PEFT layout.

Under torchrun (`torchrun --nproc-per-node N -m glm45.cli train …`) the ranks are data parallel: each takes
every N-th batch of the same stream, gradients and expert loads are averaged over the ranks before clipping,
the optimizer step and the bias update, and rank 0 logs, evaluates and saves. A step on N ranks with
`--grad-accum A` is a step on N·A batches. The weights stay whole on every rank (Muon's Newton–Schulz needs
whole matrices), so the model must fit one device.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from glm45.config import ModelConfig
from glm45.train import data as train_data
from glm45.train.balance import RouterMonitor, load_imbalance
from glm45.train.lora import DEFAULT_TARGETS, apply_lora, save_adapter
from glm45.train.losses import masked_cross_entropy, mtp_loss
from glm45.train.optim import OPTIMIZER_CHOICES, build_optimizer, lr_factor

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class TrainConfig:
    """Every setting of a training run; `glm45 train` has one kebab-case flag per field."""

    data: str = field(default="", metadata={"help": "training conversations (JSONL)"})
    output_dir: str = field(default="runs/sft", metadata={"help": "metrics, checkpoints and the result"})
    model: str | None = field(default=None, metadata={"help": "HF folder to fine-tune"})
    init_config: str | None = field(default=None, metadata={"help": "model config JSON to train from scratch"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer folder (default: --model)"})
    eval_data: str | None = field(default=None, metadata={"help": "held-out JSONL (default: split off --data)"})
    eval_fraction: float = field(default=0.02, metadata={"help": "held-out share of --data without --eval-data"})
    on_error: str = field(default="fail", metadata={"help": "malformed JSONL lines: fail or skip"})
    max_seq_len: int = 2048
    batch_tokens: int = field(default=4096, metadata={"help": "padded tokens per micro-batch"})
    grad_accum: int = 1
    max_steps: int = 100
    optimizer: str = field(default="muon", metadata={"help": "muon (Muon + AdamW) or adamw"})
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    clip_grad: float = field(default=1.0, metadata={"help": "max gradient norm (0: no clipping)"})
    mtp_weight: float = field(default=0.3, metadata={"help": "weight of the MTP loss (0: off)"})
    balance_gamma: float = field(default=1e-3, metadata={"help": "loss-free balancing bias step (0: off)"})
    seq_aux_weight: float = field(default=0.0, metadata={"help": "sequence-level balance loss weight"})
    lora_rank: int = field(default=0, metadata={"help": "LoRA rank (0: full fine-tuning)"})
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = ",".join(DEFAULT_TARGETS)
    dtype: str = field(default="float32", metadata={"help": "parameter dtype: float32 or bfloat16"})
    autocast_bf16: bool = field(default=False, metadata={"help": "bf16 autocast for matmuls"})
    gradient_checkpointing: bool = False
    init_std: float = 0.02
    eval_every: int = 50
    save_every: int = 100
    log_every: int = 10
    max_minutes: float = field(default=0.0, metadata={"help": "stop (and save) after this wall time (0: none)"})
    resume: bool = False
    seed: int = 0
    threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default)"})

    def validate(self) -> None:
        if not self.data:
            raise ValueError("--data is required: a JSONL file of conversations")
        if (self.model is None) == (self.init_config is None):
            raise ValueError("give exactly one of --model (fine-tune) or --init-config (train from scratch)")
        if self.init_config is not None and self.tokenizer is None:
            raise ValueError("training from scratch (--init-config) needs --tokenizer")
        if self.optimizer not in OPTIMIZER_CHOICES:
            raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZER_CHOICES)}, got {self.optimizer!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.on_error not in train_data.ON_ERROR_CHOICES:
            raise ValueError(f"--on-error must be fail or skip, got {self.on_error!r}")
        for name in ("max_steps", "grad_accum", "batch_tokens", "max_seq_len", "log_every", "eval_every",
                     "save_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("lr", "mtp_weight", "balance_gamma", "seq_aux_weight", "weight_decay", "clip_grad",
                     "warmup_steps", "lora_rank", "max_minutes"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if self.lora_rank and self.init_config is not None:
            raise ValueError("LoRA needs a pretrained --model; it cannot train from scratch")


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
    train = train_data.tokenize_all(tqdm(conversations, desc="tokenize", leave=False), tokenizer, config.max_seq_len)
    held_out = train_data.tokenize_all(eval_conversations, tokenizer, config.max_seq_len)
    if not train:
        raise ValueError(f"{config.data} has no conversation with assistant tokens to train on")
    return train, held_out


# ---------------------------------------------------------------------------------------------------
# The loop


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
    context = monitor.paused() if monitor is not None else _nullcontext()
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


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _save_checkpoint(folder: Path, model, optimizer, step: int, config: TrainConfig) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "state.pt.tmp"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "config": dataclasses.asdict(config)}, tmp)
    tmp.replace(folder / "state.pt")


def _copy_tokenizer(source: str | Path, dest: Path) -> None:
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copy(Path(source) / name, dest / name)


def join_data_parallel(model):
    """Under torchrun with several ranks: join the process group and replicate `model` over the ranks
    (`shard_for_training` "ddp"); None for a single process."""
    from glm45.distributed import init_distributed, launched_by_torchrun

    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return None
    from glm45.parallel.data_parallel import shard_for_training

    init_distributed(torch.device("cpu"))
    return shard_for_training(model, "ddp")


def _sum_over_ranks(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def train(config: TrainConfig) -> dict[str, Any]:
    """Run training; returns a summary (steps, losses, time, expert loads, output paths)."""
    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = config.tokenizer or config.model
    tokenizer = load_tokenizer(tokenizer_dir)
    model = build_model(config, tokenizer)
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size} embeddings")
    targets = [t.strip() for t in config.lora_targets.split(",") if t.strip()]
    if config.lora_rank:
        names = apply_lora(model, config.lora_rank, config.lora_alpha, targets, config.lora_dropout)
        logger.info("LoRA rank %d on %d linear layers", config.lora_rank, len(names))
    parallel = join_data_parallel(model)
    rank, world_size = (parallel.rank, parallel.world_size) if parallel else (0, 1)
    is_main = rank == 0
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("parameters: %.2fM total, %.2fM trainable", sum(p.numel() for p in model.parameters()) / 1e6,
                trainable / 1e6)

    train_examples, eval_examples = prepare_data(config, tokenizer)
    logger.info("data: %d training and %d held-out conversations, %d training tokens", len(train_examples),
                len(eval_examples), sum(len(e) for e in train_examples))
    pad_id = tokenizer.pad_token_id
    eval_batches = train_data.fixed_batches(eval_examples, config.batch_tokens, pad_id) if eval_examples else []
    optimizer = build_optimizer(model, config.optimizer, config.lr, config.weight_decay)
    monitor = RouterMonitor(model, config.seq_aux_weight)

    start_step = 0
    checkpoint_dir = out / "checkpoint"
    if config.resume and (checkpoint_dir / "state.pt").is_file():
        state = torch.load(checkpoint_dir / "state.pt", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step = state["step"]
        logger.info("resumed from %s at step %d", checkpoint_dir, start_step)
    batches = train_data.length_bucketed_batches(train_examples, config.batch_tokens, pad_id, config.seed)
    batches = itertools.islice(batches, rank, None, world_size)  # this rank's share of one stream
    for _ in range(start_step * config.grad_accum):  # the same data order as an uninterrupted run
        next(batches)

    metrics_file = (out / "metrics.jsonl").open("a" if config.resume else "w") if is_main else None
    log = functools.partial(_write_metrics, metrics_file) if is_main else (lambda record: None)
    model.train()
    started = time.perf_counter()
    window_tokens, window_start = 0, time.perf_counter()
    window_loads: dict[str, torch.Tensor] = {}
    window_losses: dict[str, float] = {}
    window_steps = 0
    last: dict[str, float] = {}
    progress = tqdm(range(start_step, config.max_steps), desc="train", initial=start_step, total=config.max_steps,
                    disable=not is_main)
    step = start_step
    for step in progress:
        optimizer.set_lr_factor(lr_factor(step, config.max_steps, config.warmup_steps, config.min_lr_ratio))
        sums: dict[str, float] = {}
        step_tokens = 0
        for _ in range(config.grad_accum):
            batch = next(batches)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.autocast_bf16):
                losses = compute_losses(model, batch, config.mtp_weight, monitor)
            with monitor.paused():  # gradient checkpointing re-runs the routers in backward
                (losses["loss"] / config.grad_accum).backward()
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach()) / config.grad_accum
            step_tokens += int(batch.attention_mask.sum())
        if parallel is not None:
            parallel.reduce_gradients()
            for load in monitor.loads.values():  # every rank moves the biases by the loads of all ranks
                dist.all_reduce(load)
            keys = sorted(sums)
            *totals, step_tokens = _sum_over_ranks([sums[k] for k in keys] + [step_tokens])
            sums = {k: total / world_size for k, total in zip(keys, totals, strict=True)}
        window_tokens += int(step_tokens)
        params = [p for p in model.parameters() if p.grad is not None]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.clip_grad if config.clip_grad > 0
                                                        else math.inf))
        optimizer.step()
        optimizer.zero_grad()
        # The bias update uses this step's loads; the logged statistics use the whole logging window.
        monitor.update_biases(config.balance_gamma)
        for name, load in monitor.loads.items():
            window_loads[name] = window_loads.get(name, 0) + load
        monitor.reset()
        for key, value in sums.items():
            window_losses[key] = window_losses.get(key, 0.0) + value
        window_steps += 1
        last = {**sums, "grad_norm": grad_norm}
        tokens_per_s = window_tokens / (time.perf_counter() - window_start)
        progress.set_postfix(loss=f"{sums['lm']:.3f}", tok_s=f"{tokens_per_s:.0f}")

        done = step + 1
        if done % config.log_every == 0 or done == config.max_steps:
            elapsed = time.perf_counter() - window_start
            loads = load_imbalance(window_loads)
            # Losses are means over the steps since the last log line; grad_norm is this step's.
            means = {k: round(v / window_steps, 5) for k, v in window_losses.items()}
            log({"step": done, **means, "grad_norm": round(grad_norm, 4),
                 "lr": optimizer.optimizers[0].param_groups[0]["lr"], "tokens_per_s": round(window_tokens / elapsed, 1),
                 "elapsed_s": round(time.perf_counter() - started, 1),
                 "expert_load_max_over_mean": {k: round(v, 3) for k, v in loads.items()}})
            window_tokens, window_start, window_loads, window_losses, window_steps = 0, time.perf_counter(), {}, {}, 0
        if is_main and eval_batches and (done % config.eval_every == 0 or done == config.max_steps):
            scores = evaluate_loss(model, eval_batches, config.mtp_weight, monitor, config.autocast_bf16)
            log({"step": done, **{k: round(v, 5) for k, v in scores.items()}})
            last.update(scores)
            logger.info("step %d: %s", done, scores)
        if is_main and done % config.save_every == 0:
            _save_checkpoint(checkpoint_dir, model, optimizer, done, config)
        out_of_time = bool(config.max_minutes and time.perf_counter() - started > config.max_minutes * 60)
        if parallel is not None:  # all ranks stop at the same step
            out_of_time = _sum_over_ranks([float(out_of_time)])[0] > 0
        if out_of_time:
            logger.warning("stopping at step %d: --max-minutes %.1f reached", done, config.max_minutes)
            break
    progress.close()
    monitor.remove()
    final_step = step + 1
    if not is_main:
        dist.barrier()  # rank 0 saves
        dist.destroy_process_group()
        return {"steps": final_step, "rank": rank, **last}
    metrics_file.close()
    _save_checkpoint(checkpoint_dir, model, optimizer, final_step, config)

    if config.lora_rank:
        result_dir = save_adapter(model, out / "adapter", config.lora_rank, config.lora_alpha, targets,
                                  base_model=str(config.model), dropout=config.lora_dropout)
    else:
        result_dir = out / "model"
        model.save_pretrained(result_dir)
        _copy_tokenizer(tokenizer_dir, result_dir)
    summary = {"steps": final_step, "train_minutes": round((time.perf_counter() - started) / 60, 2),
               "result": str(result_dir), **last}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if parallel is not None:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def _write_metrics(handle, record: dict[str, Any]) -> None:
    handle.write(json.dumps(record) + "\n")
    handle.flush()


# ---------------------------------------------------------------------------------------------------
# CLI flags from the dataclass


def add_dataclass_arguments(parser, cls) -> None:
    """One kebab-case flag per dataclass field, typed from its annotation, with the field's default."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata.get("help", "")
        annotation = str(f.type)
        if annotation == "bool":
            parser.add_argument(flag, action=argparse_boolean(), default=default, help=help_text)
        elif annotation.startswith("int"):
            parser.add_argument(flag, type=int, default=default, help=help_text)
        elif annotation.startswith("float"):
            parser.add_argument(flag, type=float, default=default, help=help_text)
        else:
            parser.add_argument(flag, type=str, default=default, help=help_text)


def argparse_boolean():
    import argparse

    return argparse.BooleanOptionalAction


def config_from_args(cls, args, config_file: str | None = None):
    """Build `cls` from a JSON config file (optional) overridden by flags that differ from the defaults."""
    values: dict[str, Any] = {}
    if config_file:
        raw = json.loads(Path(config_file).read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{config_file}: unknown settings {unknown}")
        values.update(raw)
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        default = f.default if f.default is not dataclasses.MISSING else None
        if value != default or f.name not in values:
            values[f.name] = value
    return cls(**values)
