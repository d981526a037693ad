"""`RLConfig`: every setting of a `glm45 rl` run — `TrainConfig`'s model, optimizer, LoRA and balancing settings plus
GRPO's own (flag names as in TRL's GRPOConfig where the meaning is the same: `--num-generations`, `--beta`,
`--epsilon`, `--num-iterations`, `--loss-type`, `--scale-rewards`, `--max-completion-length`, `--temperature`)."""

from __future__ import annotations

from dataclasses import dataclass

from glm45.cli_args import arg
from glm45.train.config import TrainConfig
from glm45.train.grpo import LOSS_TYPES, SCALE_REWARDS


@dataclass
class RLConfig(TrainConfig):
    """A GRPO run; `glm45 rl` has one kebab-case flag per field."""

    data: str = arg("", "prompts (JSONL: messages or prompt, optional tools and enable_thinking; other fields go to "
                        "the reward)")
    output_dir: str = arg("runs/rl", "metrics, checkpoints and the result")
    reward: str = arg("", "the reward callable: module:function or path/to/file.py:function")
    num_generations: int = arg(8, "completions sampled per prompt (the group size G)")
    prompts_per_step: int = arg(8, "prompts per optimizer step (over all ranks)")
    max_completion_length: int = arg(256, "most tokens sampled per completion")
    temperature: float = arg(1.0, "sampling temperature of the rollouts (log-probabilities use the same)")
    beta: float = arg(0.0, "weight of the KL term to the frozen starting model (0: no reference model)")
    epsilon: float = arg(0.2, "clip range of the policy ratio")
    num_iterations: int = arg(1, "optimizer steps on each batch of rollouts (μ)")
    loss_type: str = arg("dapo", "grpo (mean per completion, then over completions) or dapo (mean over tokens)")
    scale_rewards: str = arg("group", "group (divide by the group's std) or none (Dr. GRPO)")
    rollout_speculative_tokens: int = arg(0, "MTP draft tokens per step while sampling (0: off)")
    rollout_max_num_seqs: int = arg(64, "sequences the engine batches while sampling")
    lr: float = arg(1e-5, "peak learning rate")
    warmup_steps: int = arg(0, "linear warmup steps")
    min_lr_ratio: float = arg(1.0, "final learning rate as a share of the peak (cosine decay; 1: constant)")
    mtp_weight: float = arg(0.3, "weight of the MTP layer's loss on the sampled completions (keeps drafts accepted)")
    save_every: int = arg(20, "steps between resumable checkpoints")
    export_every: int = arg(0, "also write the model (or adapter) every this many steps to output-dir/step-N (0: off)")
    log_every: int = arg(1, "steps between metrics lines")

    def validate(self) -> None:
        if not self.data:
            raise ValueError("--data is required: a JSONL file of prompts")
        if self.model is None or self.init_config is not None:
            raise ValueError("glm45 rl fine-tunes a trained model: give --model (and no --init-config)")
        if not self.reward:
            raise ValueError("--reward is required: module:function or file.py:function")
        super().validate()
        if self.export_every < 0:
            raise ValueError(f"--export-every must be >= 0, got {self.export_every}")
        for name in ("num_generations", "prompts_per_step", "max_completion_length", "num_iterations",
                     "rollout_max_num_seqs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.num_generations < 2:
            raise ValueError("--num-generations must be at least 2: advantages are relative to the group")
        if not 0 < self.temperature <= 10:
            raise ValueError(f"--temperature must be in (0, 10], got {self.temperature}")
        if self.beta < 0 or not 0 < self.epsilon < 1:
            raise ValueError(f"--beta must be >= 0 and --epsilon in (0, 1), got {self.beta} and {self.epsilon}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"--loss-type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"--scale-rewards must be one of {', '.join(SCALE_REWARDS)}, got {self.scale_rewards!r}")
        if not 0 <= self.rollout_speculative_tokens <= 8:
            raise ValueError(f"--rollout-speculative-tokens must be in [0, 8], got {self.rollout_speculative_tokens}")
