"""Supervised fine-tuning (full or LoRA), preference tuning (DPO, `--stage dpo`, see `dpo.py`) and training from
scratch: the loop behind `glm45 train`.

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
every N-th batch of the same stream, and a step on N ranks with `--grad-accum A` is a step on N·A batches. Full
fine-tuning shards the parameters, gradients and optimizer state over the ranks with FSDP2 (sharded checkpoints,
a whole HF checkpoint at the end); LoRA keeps the frozen base whole on every rank (`session.py`). Rank 0 logs
and writes the result.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import random
import time
from typing import Any

import torch
from tqdm import tqdm

from glm45.train import data as train_data
from glm45.train import dpo
from glm45.train.balance import RouterMonitor, load_imbalance
from glm45.train.config import TrainConfig
from glm45.train.losses import masked_cross_entropy, mtp_loss
from glm45.train.session import TrainingSession, enable_gradient_checkpointing  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)


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
    """One supervised (SFT) or preference (DPO) run: a `TrainingSession` (model, LoRA, parallelism, optimizer,
    balancing), its data and the loop."""

    def __init__(self, config: TrainConfig):
        self.session = session = TrainingSession(config)
        self.config, self.model, self.tokenizer = config, session.model, session.tokenizer
        self.is_main, self.monitor, self.optimizer = session.is_main, session.monitor, session.optimizer
        resumed = session.load_checkpoint() if config.resume else None
        self.start_step, extra = resumed if resumed else (0, {})
        if resumed is not None:
            logger.info("resumed from %s at step %d", session.checkpoint_dir, self.start_step)
        batches = self._dpo_data(extra) if config.stage == "dpo" else self._sft_data()
        self.batches = itertools.islice(batches, session.rank, None, session.world_size)  # this rank's share
        for _ in range(self.start_step * config.grad_accum):  # the same data order as an uninterrupted run
            next(self.batches)

    def _sft_data(self):
        config, pad_id = self.config, self.tokenizer.pad_token_id
        train_examples, eval_examples = prepare_data(config, self.tokenizer)
        logger.info("data: %d training and %d held-out conversations, %d training tokens", len(train_examples),
                    len(eval_examples), sum(len(e) for e in train_examples))
        self.eval_batches = train_data.fixed_batches(eval_examples, config.batch_tokens, pad_id) \
            if eval_examples else []
        return train_data.length_bucketed_batches(train_examples, config.batch_tokens, pad_id, config.seed)

    def _dpo_data(self, extra: dict):
        """Preference pairs, split like SFT data; the reference log-probabilities come from the model before its
        first step (or from the checkpoint when resuming)."""
        config, pad_id = self.config, self.tokenizer.pad_token_id
        pairs = dpo.load_pairs(config.data)
        if config.eval_data is not None:
            held_out = dpo.load_pairs(config.eval_data)
        else:
            random.Random(config.seed).shuffle(pairs)
            num_eval = int(len(pairs) * config.eval_fraction)
            held_out, pairs = pairs[:num_eval], pairs[num_eval:]
        train = dpo.tokenize_pairs(pairs, self.tokenizer, config.max_seq_len)
        evaluation = dpo.tokenize_pairs(held_out, self.tokenizer, config.max_seq_len)
        for example in evaluation:  # one index space for both: the keys of the reference log-probabilities
            example.index += len(pairs)
        if not train:
            raise ValueError(f"{config.data} has no preference pair with answer tokens to train on")
        logger.info("data: %d training and %d held-out preference pairs", len(train), len(evaluation))
        if "reference_logprobs" in extra:
            self.reference = {int(i): [c, r] for i, c, r in extra["reference_logprobs"]}
        else:
            with self.monitor.paused():
                self.reference = dpo.reference_logprobs(self.model, train + evaluation, config.batch_tokens, pad_id)
        self.eval_batches = dpo.fixed_pair_batches(evaluation, config.batch_tokens, pad_id)
        return dpo.pair_batches(train, config.batch_tokens, pad_id, config.seed)

    def _checkpoint_extra(self) -> dict:
        if self.config.stage != "dpo":
            return {}
        return {"reference_logprobs": [[i, c, r] for i, (c, r) in sorted(self.reference.items())]}

    def _losses(self, batch) -> dict[str, Any]:
        config = self.config
        if config.stage == "dpo":
            self.monitor.token_mask = batch.batch.attention_mask
            return dpo.dpo_losses(self.model, batch, self.reference, config.pref_beta, config.pref_ftx,
                                  config.mtp_weight)
        return compute_losses(self.model, batch, config.mtp_weight, self.monitor)

    def step(self, step: int) -> tuple[dict[str, float], int, float]:
        """One optimizer step: (mean losses, tokens, gradient norm); the balancing biases move after it."""
        config = self.config
        self.session.set_lr(step)
        sums: dict[str, float] = {}
        tokens = 0
        for _ in range(config.grad_accum):
            batch = next(self.batches)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.autocast_bf16):
                losses = self._losses(batch)
                aux = self.monitor.take_aux_loss() if config.stage == "dpo" else None
                if aux is not None:
                    losses["loss"] = losses["loss"] + aux
            with self.monitor.paused():  # gradient checkpointing re-runs the routers in backward
                (losses["loss"] / config.grad_accum).backward()
            for key, value in losses.items():
                value = value.detach() if isinstance(value, torch.Tensor) else value
                sums[key] = sums.get(key, 0.0) + float(value) / config.grad_accum
            rows = batch.batch if config.stage == "dpo" else batch
            tokens += int(rows.attention_mask.sum())
        return self.session.optimizer_step(sums, tokens)

    def run(self) -> dict[str, Any]:
        """Train to `max_steps` (or `max_minutes`); returns a summary (steps, losses, time, output paths)."""
        config = self.config
        metrics = (self.session.out / "metrics.jsonl").open("a" if config.resume else "w") if self.is_main else None
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
            progress.set_postfix(loss=f"{sums['loss' if config.stage == 'dpo' else 'lm']:.3f}",
                                 tok_s=f"{window.tokens_per_s:.0f}")
            done = step + 1
            if metrics is not None and (done % config.log_every == 0 or done == config.max_steps):
                self._log_window(metrics, done, window, grad_norm, started)
                window = _Window()
            last.update(self._evaluate(metrics, done))
            if done % config.save_every == 0:
                self.session.save_checkpoint(done, self._checkpoint_extra())
            out_of_time = bool(config.max_minutes and time.perf_counter() - started > config.max_minutes * 60)
            if self.session.any_rank(out_of_time):
                logger.warning("stopping at step %d: --max-minutes %.1f reached", done, config.max_minutes)
                break
        progress.close()
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
        if not (self.eval_batches and (step % config.eval_every == 0 or step == config.max_steps)):
            return {}
        if not (self.is_main or self.session.sharded):  # under FSDP every rank takes part in the forward
            return {}
        if config.stage == "dpo":
            scores = self._evaluate_dpo()
        else:
            scores = evaluate_loss(self.model, self.eval_batches, config.mtp_weight, self.monitor,
                                   config.autocast_bf16)
        if metrics is not None:
            _write(metrics, {"step": step, **{k: round(v, 5) for k, v in scores.items()}})
            logger.info("step %d: %s", step, scores)
        return scores

    @torch.no_grad()
    def _evaluate_dpo(self) -> dict[str, float]:
        """Held-out DPO loss and TRL's statistics, weighted by pairs."""
        self.model.eval()
        totals: dict[str, float] = {}
        num_pairs = 0
        with self.monitor.paused():
            for batch in self.eval_batches:
                losses = dpo.dpo_losses(self.model, batch, self.reference, self.config.pref_beta, 0.0, 0.0)
                for key in ("dpo", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
                    totals[key] = totals.get(key, 0.0) + float(losses[key]) * len(batch.indices)
                num_pairs += len(batch.indices)
        self.model.train()
        return {f"eval_{k}": v / max(1, num_pairs) for k, v in totals.items()}

    def _finish(self, final_step: int, started: float, last: dict[str, float], metrics) -> dict[str, Any]:
        session = self.session
        session.save_checkpoint(final_step, self._checkpoint_extra())
        result_dir = session.export()
        summary = {"steps": final_step, "rank": session.rank, **last}
        if session.sharded:
            summary.update(parameter_bytes_this_rank=session.local_parameter_bytes,
                           parameter_bytes_whole=sum(p.numel() * p.element_size() for p in self.model.parameters()))
        if self.is_main:
            metrics.close()
            summary = {"steps": final_step, "train_minutes": round((time.perf_counter() - started) / 60, 2),
                       "result": str(result_dir), "world_size": session.world_size, **summary}
            del summary["rank"]
            (session.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        session.close()
        return summary


def train(config: TrainConfig) -> dict[str, Any]:
    """Run training; returns a summary (steps, losses, time, expert loads, output paths)."""
    return Trainer(config).run()


def _write(handle, record: dict[str, Any]) -> None:
    handle.write(json.dumps(record) + "\n")
    handle.flush()
