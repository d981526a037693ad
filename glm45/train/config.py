"""`TrainConfig`: every setting of a `glm45 train` run (one kebab-case flag per field, or a JSON file)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glm45.cli_args import arg
from glm45.train.data import ON_ERROR_CHOICES
from glm45.train.lora import DEFAULT_TARGETS
from glm45.train.optim import NS_DTYPES, OPTIMIZER_CHOICES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
STAGES = ("sft", "dpo")


@dataclass
class TrainConfig:
    """Every setting of a training run; `glm45 train` has one kebab-case flag per field."""

    data: str = arg("", "training conversations (JSONL), or preference pairs with --stage dpo")
    stage: str = arg("sft", "sft (loss on the assistant's turns) or dpo (preference pairs: chosen / rejected)")
    pref_beta: float = arg(0.1, "DPO's β: how far the policy may move from the reference per unit of margin")
    pref_ftx: float = arg(0.0, "DPO: weight of the SFT loss on the chosen answers")
    output_dir: str = arg("runs/sft", "metrics, checkpoints and the result")
    model: str | None = arg(None, "HF folder to fine-tune")
    init_config: str | None = arg(None, "model config JSON to train from scratch")
    tokenizer: str | None = arg(None, "tokenizer folder (default: --model)")
    eval_data: str | None = arg(None, "held-out JSONL (default: split off --data)")
    eval_fraction: float = arg(0.02, "held-out share of --data without --eval-data")
    on_error: str = arg("fail", "malformed JSONL lines: fail or skip")
    max_seq_len: int = arg(2048, "longer conversations are cut to this many tokens")
    batch_tokens: int = arg(4096, "padded tokens per micro-batch")
    grad_accum: int = arg(1, "micro-batches per optimizer step")
    max_steps: int = arg(100, "optimizer steps")
    optimizer: str = arg("muon", "muon (Muon + AdamW) or adamw")
    muon_ns_dtype: str = arg("auto", "Muon's Newton–Schulz precision: auto (bf16 where the CPU/GPU has bf16 "
                             "matmuls, else float32), float32 or bfloat16")
    lr: float = arg(1e-3, "peak learning rate")
    min_lr_ratio: float = arg(0.1, "final learning rate as a share of the peak (cosine decay)")
    warmup_steps: int = arg(10, "linear warmup steps")
    weight_decay: float = arg(0.0, "decoupled weight decay")
    clip_grad: float = arg(1.0, "max gradient norm (0: no clipping)")
    mtp_weight: float = arg(0.3, "weight of the MTP loss (0: off)")
    balance_gamma: float = arg(1e-3, "loss-free balancing bias step (0: off)")
    seq_aux_weight: float = arg(0.0, "sequence-level balance loss weight")
    lora_rank: int = arg(0, "LoRA rank (0: full fine-tuning)")
    lora_alpha: float = arg(16.0, "LoRA scale numerator (the update is alpha/rank · B A)")
    lora_dropout: float = arg(0.0, "dropout on the LoRA branch input")
    lora_targets: str = arg(",".join(DEFAULT_TARGETS), "comma-separated module names to adapt: q_proj, k_proj, "
                            "v_proj, o_proj, gate_proj, up_proj, down_proj, experts (routed), eh_proj (MTP)")
    lora_mtp: bool = arg(False, "also adapt the MTP layer's target modules (its drafts then follow the fine-tune)")
    dtype: str = arg("float32", "parameter dtype: float32 or bfloat16")
    autocast_bf16: bool = arg(False, "bf16 autocast for matmuls")
    gradient_checkpointing: bool = arg(False, "recompute each layer in backward to save memory")
    init_std: float = arg(0.02, "weight init std when training from scratch")
    eval_every: int = arg(50, "steps between held-out evaluations")
    save_every: int = arg(100, "steps between resumable checkpoints")
    log_every: int = arg(10, "steps between metrics lines")
    max_minutes: float = arg(0.0, "stop (and save) after this wall time (0: none)")
    resume: bool = arg(False, "continue from output-dir/checkpoint if it exists")
    seed: int = arg(0, "data order, held-out split and init")
    threads: int = arg(0, "torch threads (0: torch's default)")

    def validate(self) -> None:
        if not self.data:
            raise ValueError("--data is required: a JSONL file of conversations")
        if (self.model is None) == (self.init_config is None):
            raise ValueError("give exactly one of --model (fine-tune) or --init-config (train from scratch)")
        if self.init_config is not None and self.tokenizer is None:
            raise ValueError("training from scratch (--init-config) needs --tokenizer")
        if self.stage not in STAGES:
            raise ValueError(f"--stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if self.stage == "dpo" and (self.pref_beta <= 0 or self.pref_ftx < 0):
            raise ValueError(f"--pref-beta must be > 0 and --pref-ftx >= 0, got {self.pref_beta} and {self.pref_ftx}")
        if self.stage == "dpo" and self.init_config is not None:
            raise ValueError("DPO fine-tunes a trained --model; it cannot train from scratch")
        if self.optimizer not in OPTIMIZER_CHOICES:
            raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZER_CHOICES)}, got {self.optimizer!r}")
        if self.muon_ns_dtype not in NS_DTYPES:
            raise ValueError(f"--muon-ns-dtype must be one of {', '.join(NS_DTYPES)}, got {self.muon_ns_dtype!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.on_error not in ON_ERROR_CHOICES:
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
        if self.lora_mtp and not self.lora_rank:
            raise ValueError("--lora-mtp needs --lora-rank > 0")
        if self.lora_rank and self.init_config is not None:
            raise ValueError("LoRA needs a pretrained --model; it cannot train from scratch")
