"""The `glm45 train`, `glm45 rl` and `glm45 merge` subcommands (registered by `glm45.cli.build_parser`).

    glm45 train --data chats.jsonl --model BASE --output-dir runs/sft [--lora-rank 16] [--config run.json]
    glm45 rl --data prompts.jsonl --reward my_rewards:score --model BASE --output-dir runs/rl
    glm45 merge --base BASE --adapter runs/sft/adapter --out merged/

Every `TrainConfig` field is a kebab-case flag; `--config` reads the same settings from a JSON file, and flags
given on the command line override it.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

# TrainConfig settings that mean nothing to GRPO (no held-out split, no training from scratch, micro-batches by tokens)
RL_UNUSED = ("init_config", "eval_data", "eval_fraction", "eval_every", "grad_accum", "init_std", "on_error",
             "max_seq_len")


def cmd_train(args: argparse.Namespace) -> int:
    from glm45.cli_args import dataclass_from_args
    from glm45.train.config import TrainConfig
    from glm45.train.trainer import train

    config = dataclass_from_args(TrainConfig, args, args.config)
    summary = train(config)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_rl(args: argparse.Namespace) -> int:
    from glm45.cli_args import dataclass_from_args
    from glm45.train.rl import rl
    from glm45.train.rl_config import RLConfig

    config = dataclass_from_args(RLConfig, args, args.config)
    summary = rl(config)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    import torch

    from glm45.model import Glm4MoeForCausalLM
    from glm45.train.checkpoint import copy_tokenizer
    from glm45.train.config import DTYPES
    from glm45.train.lora import merge_lora
    from glm45.train.lora_io import load_adapter

    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
    model = Glm4MoeForCausalLM.from_pretrained(args.base, dtype=torch.float32, progress=False)
    names = load_adapter(model, args.adapter)
    merge_lora(model).to(DTYPES[args.dtype]).save_pretrained(args.out)
    copy_tokenizer(args.base, Path(args.out))
    logger.info("merged %d LoRA adapters into %s", len(names), args.out)
    return 0


def add_train_subcommands(sub) -> None:
    from glm45.cli_args import add_dataclass_arguments
    from glm45.train.config import TrainConfig

    train = sub.add_parser("train", help="fine-tune (full or LoRA) or train from scratch",
                           description="Supervised fine-tuning on JSONL conversations, loss on assistant tokens.")
    train.add_argument("--config", default=None, help="JSON file of training settings (flags override it)")
    add_dataclass_arguments(train, TrainConfig)
    train.set_defaults(func=cmd_train)

    from glm45.train.rl_config import RLConfig

    rl = sub.add_parser("rl", help="reinforcement learning with GRPO (rollouts from glm45's engine)",
                        description="GRPO on JSONL prompts with a Python reward; full fine-tuning or LoRA.")
    rl.add_argument("--config", default=None, help="JSON file of RL settings (flags override it)")
    add_dataclass_arguments(rl, RLConfig, skip=RL_UNUSED)
    rl.set_defaults(func=cmd_rl)

    merge = sub.add_parser("merge", help="fold a LoRA adapter (PEFT layout) into an HF checkpoint")
    merge.add_argument("--base", required=True, help="the base model folder the adapter was trained on")
    merge.add_argument("--adapter", required=True, help="the adapter folder (adapter_config.json + weights)")
    merge.add_argument("--out", required=True, help="where to write the merged model")
    merge.add_argument("--dtype", default="float32", help="dtype of the merged weights: float32 or bfloat16")
    merge.set_defaults(func=cmd_merge)
