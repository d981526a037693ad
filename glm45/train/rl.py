"""Reinforcement learning with GRPO: the loop behind `glm45 rl`.

Each step: take `--prompts-per-step` prompts (a seeded shuffle, epoch after epoch), sample `--num-generations`
completions of each with glm45's engine running the policy's own modules in this process (`rollout.py`), score them
with the reward, normalise the rewards within each group (`grpo.py`), and take `--num-iterations` optimizer steps on
the clipped policy-ratio loss (plus β·KL to the frozen starting model, plus `--mtp-weight` × the MTP layer's loss on
the completions, which keeps its drafts in step with the policy). The optimizers, LoRA, loss-free balancing and
checkpoints are `glm45 train`'s (`session.py`). After every update the engine is told (`weights_updated`): its prefix
cache and captured decode step hold what the old weights computed.

Completions whose advantage is zero (every sample of their group scored the same) carry no policy gradient; with
β = 0 they are left out of the forward and backward passes, while the loss is still normalised as if they were there.

Written to `--output-dir`: `metrics.jsonl` (one line per step: reward, KL, lengths, clipping, tokens per second of
sampling and training), `metrics.png` (with matplotlib), `checkpoint/` (`--resume`; sampling is seeded by step, so a
resumed run draws what an uninterrupted one would), and the result: the model in the HF layout or the adapter.
Under torchrun each rank samples and trains on its share of the prompts: LoRA data parallel, full fine-tuning with
FSDP2 (the engine then runs a whole copy of the weights on every rank, gathered after each update, and the ranks run
equally many forward passes, the extra ones weighing nothing, as FSDP's collectives need).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from glm45.train import grpo
from glm45.train.balance import load_imbalance
from glm45.train.lora import lora_modules
from glm45.train.rl_config import RLConfig
from glm45.train.rollout import Completion, Rollouts, load_prompts, load_reward
from glm45.train.session import TrainingSession, build_model, max_over_ranks, sum_over_ranks, whole_model

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def adapters_off(model):
    """The base model's outputs from a LoRA model: every adapter's scale set to 0 inside."""
    modules = list(lora_modules(model).values())
    scales = [m.scaling for m in modules]
    for m in modules:
        m.scaling = 0.0
    try:
        yield
    finally:
        for m, scale in zip(modules, scales, strict=True):
            m.scaling = scale


def pack(items: list[tuple[Completion, float]], budget: int) -> list[list[tuple[Completion, float]]]:
    """Micro-batches of at most `budget` padded tokens (longest first, so rows of a batch are alike)."""
    ordered = sorted(items, key=lambda item: -(len(item[0].prompt_ids) + len(item[0].token_ids)))
    batches, current, width = [], [], 0
    for item in ordered:
        length = len(item[0].prompt_ids) + len(item[0].token_ids)
        if current and max(width, length) * (len(current) + 1) > budget:
            batches.append(current)
            current, width = [], 0
        current.append(item)
        width = max(width, length)
    if current:
        batches.append(current)
    return batches


def collate(items: list[tuple[Completion, float]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids [B, L], completion_mask [B, L], attention_mask [B, L]) for prompt + completion rows."""
    width = max(len(c.prompt_ids) + len(c.token_ids) for c, _ in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    completion = torch.zeros((len(items), width), dtype=torch.bool)
    attention = torch.zeros((len(items), width), dtype=torch.bool)
    for row, (c, _) in enumerate(items):
        n, m = len(c.prompt_ids), len(c.token_ids)
        ids[row, :n + m] = torch.tensor(c.prompt_ids + c.token_ids)
        completion[row, n:n + m] = True
        attention[row, :n + m] = True
    return ids, completion, attention


class GRPOTrainer:
    """One GRPO run: a training session, the prompts and reward, the rollout engine and the loop."""

    def __init__(self, config: RLConfig):
        config.validate()
        self.session = session = TrainingSession(config)
        self.config, self.model, self.tokenizer = config, session.model, session.tokenizer
        # The engine runs whole weights: under FSDP a plain copy on every rank, refreshed after each update.
        self.rollout_model = self.model
        if session.sharded:
            self.rollout_model = whole_model(self.model.config, session.parallel.full_state_dict()).eval()
        self.rows = load_prompts(config.data)
        self.reward = load_reward(config.reward)
        self.reference = None
        if config.beta > 0 and not config.lora_rank:  # LoRA's reference is the same model with its adapters off
            self.reference = build_model(config, self.tokenizer).eval().requires_grad_(False)
        self.train_mtp = self.model.mtp is not None and config.mtp_weight > 0 and \
            any(p.requires_grad for p in self.model.mtp.parameters())
        self.engine = self._engine()
        self.rollouts = Rollouts(self.engine, self.reward, config.num_generations, config.temperature,
                                 config.max_completion_length, config.seed)
        resumed = session.load_checkpoint() if config.resume else None
        self.start_step = resumed[0] if resumed else 0
        if resumed is not None:
            self.publish_weights()
            logger.info("resumed from %s at step %d", session.checkpoint_dir, self.start_step)

    def _engine(self):
        from glm45.config import EngineConfig
        from glm45.engine.engine import LLMEngine

        config = self.config
        k = config.rollout_speculative_tokens
        if k and self.model.mtp is None:
            raise ValueError("--rollout-speculative-tokens needs a model with an MTP layer")
        # The captured decode step reads the base weights directly; LoRA branches run only on the eager path.
        engine_config = EngineConfig(model=config.model, dtype=config.dtype, num_speculative_tokens=k,
                                     max_num_seqs=config.rollout_max_num_seqs, enforce_eager=bool(config.lora_rank),
                                     seed=config.seed)
        return LLMEngine(engine_config, model=self.rollout_model, tokenizer=self.tokenizer)

    def publish_weights(self) -> None:
        """After an update: the engine's copy refreshed (FSDP: gathered), its prefix cache and captured step redone."""
        if self.rollout_model is not self.model:
            with torch.no_grad():
                self.rollout_model.load_state_dict(self.session.parallel.full_state_dict())
        self.engine.weights_updated()

    def prompts_for(self, step: int) -> list:
        """This rank's share of the step's prompts: a seeded permutation per epoch, cycled."""
        count, num_rows = self.config.prompts_per_step, len(self.rows)
        chosen = []
        for j in range(step * count, (step + 1) * count):
            epoch, index = divmod(j, num_rows)
            order = list(range(num_rows))
            random.Random(self.config.seed * 7919 + epoch).shuffle(order)
            chosen.append(self.rows[order[index]])
        return chosen[self.session.rank::self.session.world_size]

    # ------------------------------------------------------------------ one step
    def step(self, step: int, progress) -> dict[str, float]:
        config, session = self.config, self.session
        started = time.perf_counter()
        self.model.eval()
        with session.monitor.paused(), torch.no_grad():
            batch = self.rollouts.sample(self.prompts_for(step), step, progress)
        rewards = torch.tensor([c.reward for c in batch.completions])
        advantages = grpo.group_advantages(rewards, config.num_generations, config.scale_rewards)
        items = list(zip(batch.completions, advantages.tolist(), strict=True))
        # The step's normaliser counts every completion, also those left out below (their loss is zero).
        local = sum(len(c.token_ids) for c in batch.completions) if config.loss_type == "dapo" else len(items)
        total = sum_over_ranks([float(local)])[0] if session.parallel is not None else float(local)
        normaliser = max(1.0, total / session.world_size)
        trained = [it for it in items if it[1] != 0.0] if config.beta == 0 else items
        self.model.train()
        train_started = time.perf_counter()
        stats: dict[str, float] = {}
        micro_batches = [(mb, 1.0) for mb in pack(trained, config.batch_tokens)]
        if session.sharded:  # FSDP: every rank runs as many forwards; the extra ones weigh nothing
            most = int(max_over_ranks(len(micro_batches)))
            micro_batches += [(items[:1], 0.0)] * (most - len(micro_batches))
        for iteration in range(config.num_iterations):
            session.set_lr(step)
            stats = self._update(micro_batches, normaliser, iteration)
        self.publish_weights()
        train_seconds = time.perf_counter() - train_started
        groups = rewards.view(-1, config.num_generations)
        lengths = [len(c.token_ids) for c in batch.completions]
        return {
            "reward": float(rewards.mean()), "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
            "groups_without_signal": float((groups.std(dim=1) == 0).float().mean()),
            "completion_length": sum(lengths) / len(lengths), "completion_length_max": max(lengths),
            "truncated": sum(c.parsed["finish_reason"] == "length" for c in batch.completions) / len(lengths),
            **stats, "rollout_tokens_per_s": batch.tokens / max(batch.seconds, 1e-9),
            "train_tokens_per_s": stats.get("train_tokens", 0) / max(train_seconds, 1e-9),
            "rollout_s": batch.seconds, "train_s": train_seconds, "step_s": time.perf_counter() - started,
        }

    def _update(self, micro_batches, normaliser: float, iteration: int) -> dict[str, float]:
        """One optimizer step over the (micro-batch, weight) pairs; returns its statistics."""
        config, session = self.config, self.session
        if iteration == 0:
            self._old = [self._logprobs(mb)[0] for mb, _ in micro_batches] if config.num_iterations > 1 else None
        sums = {"loss": 0.0, "kl": 0.0, "clipped": 0.0, "mtp": 0.0}
        tokens = train_tokens = 0
        mtp_tokens = sum(len(c.token_ids) for mb, weight in micro_batches if weight for c, _ in mb)
        for index, (mb, weight) in enumerate(micro_batches):
            ids, completion, attention = collate(mb, self.tokenizer.pad_token_id)
            session.monitor.token_mask = attention
            uncounted = session.monitor.paused() if not weight else contextlib.nullcontext()  # FSDP's extra forwards
            with uncounted, torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.autocast_bf16):
                logprobs, hidden = grpo.token_logprobs(self.model, ids, completion, config.temperature)
            old = logprobs.detach() if self._old is None else self._old[index]
            reference = self._reference_logprobs(ids, completion) if config.beta > 0 else None
            advantages = torch.tensor([a for _, a in mb])
            lengths = [len(c.token_ids) for c, _ in mb]
            part = grpo.policy_loss(logprobs, old, advantages, reference, lengths, config.epsilon, config.beta,
                                    config.loss_type, normaliser)
            loss = part.loss
            if self.train_mtp:
                share = sum(lengths) / max(1, mtp_tokens)
                mtp = grpo.mtp_self_distillation(self.model, hidden, ids, completion)
                loss = loss + config.mtp_weight * share * mtp
                sums["mtp"] += float(mtp.detach()) * share
            aux = session.monitor.take_aux_loss()
            if aux is not None:
                loss = loss + aux / len(micro_batches)
            with session.monitor.paused():
                (loss * weight).backward()
            if not weight:
                continue
            sums["loss"] += float(part.loss.detach())
            sums["kl"] += part.kl_sum
            sums["clipped"] += part.clipped_tokens
            tokens += part.tokens
            train_tokens += int(attention.sum())
        kl_sum, clipped = sums.pop("kl"), sums.pop("clipped")
        sums, _, grad_norm = session.optimizer_step(sums, train_tokens)
        loads = load_imbalance(session.monitor.loads)
        session.monitor.reset()
        out = {**sums, "grad_norm": grad_norm, "train_tokens": train_tokens, "trained_completions":
               sum(len(mb) for mb, weight in micro_batches if weight), "clip_fraction": clipped / max(1, tokens),
               "expert_load_max_over_mean": {k: round(v, 3) for k, v in loads.items()}}
        if config.beta > 0:
            out["kl"] = kl_sum / max(1, tokens)
        return out

    @torch.no_grad()
    def _logprobs(self, mb) -> tuple[torch.Tensor, torch.Tensor]:
        ids, completion, _ = collate(mb, self.tokenizer.pad_token_id)
        with self.session.monitor.paused():
            return grpo.token_logprobs(self.model, ids, completion, self.config.temperature)

    @torch.no_grad()
    def _reference_logprobs(self, ids: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
        with self.session.monitor.paused():
            if self.reference is not None:
                return grpo.token_logprobs(self.reference, ids, completion, self.config.temperature)[0]
            with adapters_off(self.model):
                return grpo.token_logprobs(self.model, ids, completion, self.config.temperature)[0]

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        config, session = self.config, self.session
        metrics_path = session.out / "metrics.jsonl"
        metrics = metrics_path.open("a" if config.resume else "w") if session.is_main else None
        started = time.perf_counter()
        progress = tqdm(range(self.start_step, config.max_steps), desc="rl", initial=self.start_step,
                        total=config.max_steps, disable=not session.is_main)
        samples = tqdm(desc="rollouts", unit="completion", leave=False, disable=not session.is_main)
        record: dict[str, Any] = {}
        step = self.start_step
        for step in progress:
            record = {"step": step + 1, **self.step(step, samples),
                      "elapsed_s": round(time.perf_counter() - started, 1)}
            progress.set_postfix(reward=f"{record['reward']:.3f}", tok_s=f"{record['rollout_tokens_per_s']:.0f}")
            done = step + 1
            if metrics is not None and (done % config.log_every == 0 or done == config.max_steps):
                metrics.write(json.dumps({k: round(v, 5) if isinstance(v, float) else v
                                          for k, v in record.items()}) + "\n")
                metrics.flush()
            if done % config.save_every == 0:
                session.save_checkpoint(done)
            if config.export_every and done % config.export_every == 0:
                session.export(session.out / f"step-{done}")
            out_of_time = bool(config.max_minutes and time.perf_counter() - started > config.max_minutes * 60)
            if session.any_rank(out_of_time):
                logger.warning("stopping at step %d: --max-minutes %.1f reached", done, config.max_minutes)
                break
        samples.close()
        progress.close()
        session.save_checkpoint(step + 1)
        result_dir = session.export()
        summary = {"steps": step + 1, "rank": session.rank, **{k: v for k, v in record.items() if k != "step"}}
        if session.is_main:
            metrics.close()
            summary = {"steps": step + 1, "rl_minutes": round((time.perf_counter() - started) / 60, 2),
                       "result": str(result_dir), **{k: v for k, v in record.items() if k != "step"}}
            (session.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            plot_metrics(metrics_path, session.out / "metrics.png")
        session.close()
        return summary


def plot_metrics(metrics_path: Path, out: Path) -> Path | None:
    """Reward, KL and completion length against the step (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed: no %s", out.name)
        return None
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    panels = [("reward", "reward (mean over completions)"), ("completion_length", "completion tokens (mean)")]
    if any("kl" in r for r in records):
        panels.append(("kl", "KL to the reference (per token)"))
    figure, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), sharex=True)
    for axis, (key, label) in zip(axes, panels, strict=True):
        points = [(r["step"], r[key]) for r in records if key in r]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker=".", linewidth=1)
        axis.set_ylabel(label, fontsize=8)
        axis.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def rl(config: RLConfig) -> dict[str, Any]:
    """Run GRPO; returns a summary (steps, last metrics, time, output path)."""
    return GRPOTrainer(config).run()
