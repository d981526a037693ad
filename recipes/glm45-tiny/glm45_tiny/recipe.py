"""The recipe of the bundled small model (`glm45/assets/glm45-tiny`): data, tokenizer, model config, training.

One command trains it from scratch in under 90 minutes on the 2-core CPU (both threads):

    python -m glm45_tiny.recipe --out runs/glm45-tiny-v5 --install

(the defaults: 40,000 conversations, 3,200 planned steps of 6,144 padded tokens, stopping at 86 minutes at the
latest, 2 threads, 10% copying drills, 60% of the made-up words strung from the tokenizer's word pieces, the
training task mix `glm45_tiny.synthetic.TRAIN_TASK_MIX`. The history of the recipe and which one is bundled:
`recipes/glm45-tiny/README.md`).

1. generates synthetic agent conversations (`glm45_tiny.synthetic`, `--data-seed`) and a held-out split
   (seed 1), with `--copy-drill` of them "repeat after me" drills;
2. trains a 3k-token byte-level BPE with all GLM-4.5 added tokens on their rendered text, with the copy split
   (`glm45_tiny.tokenizer_build.COPY_SPLIT_PATTERN`: spaces and digits are their own pieces, so a city or a number
   is the same tokens in the request and in the tool call that must copy it);
3. draws the training conversations again with `--piece-share` of the made-up words strung from that
   tokenizer's word pieces, so that every piece a real word is made of is written in a copied value;
4. trains a GLM-4.5-architecture model from scratch (QK-norm, partial RoPE, one dense layer then MoE layers
   with sigmoid routing and a shared expert, one MTP layer) with Muon, loss-free balancing and the MTP loss.

`--init-from` continues from a trained model instead, keeping its tokenizer; `--install` copies the result
(config, weights with the MTP layer, tokenizer) into the package. `recipes/glm45-tiny/README.md` has the exact
command the bundled weights came from and their evaluation
(`python -m glm45_tiny.evaluate glm45/assets/glm45-tiny`).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from glm45.chat import render_chat
from glm45.tokenizer import Tokenizer
from glm45.train.config import TrainConfig
from glm45.train.trainer import train
from glm45_tiny.synthetic import generate, write_jsonl
from glm45_tiny.tokenizer_build import COPY_SPLIT_PATTERN, build_tokenizer

logger = logging.getLogger(__name__)

ASSET_DIR = Path(__file__).resolve().parents[3] / "glm45" / "assets" / "glm45-tiny"
VOCAB_SIZE = 3072
MODEL_CONFIG = {
    "hidden_size": 256, "intermediate_size": 768, "moe_intermediate_size": 128, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "use_qk_norm": True,
    "partial_rotary_factor": 0.5, "rope_theta": 10000.0, "first_k_dense_replace": 1, "n_routed_experts": 8,
    "num_experts_per_tok": 2, "n_shared_experts": 1, "routed_scaling_factor": 1.0, "norm_topk_prob": True,
    "num_nextn_predict_layers": 1, "max_position_embeddings": 4096, "torch_dtype": "float32",
}
INSTALLED_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                   "tokenizer_config.json")


def prepare(out: Path, num_train: int, num_eval: int, data_seed: int = 0, copy_drill: float = 0.0,
            tokenizer_dir: Path | None = None, piece_share: float = 0.0) -> tuple[Path, Path, Path, Path]:
    """Write data, tokenizer (unless one is given) and model config into `out`; returns their paths.

    The tokenizer is trained on the rendered training conversations. With `piece_share` > 0 the training
    conversations are then drawn again (same seed) with that share of the made-up words strung from the
    tokenizer's word pieces (`glm45_tiny.synthetic.WordPieces`); the tokenizer stays the one trained on the
    first draw."""
    out.mkdir(parents=True, exist_ok=True)
    draw = functools.partial(generate, num_train, seed=data_seed, split="train", copy_drill=copy_drill)
    train_conversations = None
    if tokenizer_dir is None:
        train_conversations = draw()
        texts = (render_chat(c["messages"], c["tools"], enable_thinking=c["enable_thinking"],
                             add_generation_prompt=False) for c in train_conversations)
        tokenizer_dir = build_tokenizer(texts, VOCAB_SIZE, out / "tokenizer", COPY_SPLIT_PATTERN)
    if piece_share > 0:
        train_conversations = draw(vocabulary=Tokenizer.from_pretrained(tokenizer_dir).vocab, piece_share=piece_share)
    elif train_conversations is None:
        train_conversations = draw()
    train_file = write_jsonl(train_conversations, out / "train.jsonl")
    eval_file = write_jsonl(generate(num_eval, seed=1, split="heldout"), out / "eval.jsonl")
    config_file = out / "model_config.json"
    config_file.write_text(json.dumps(MODEL_CONFIG, indent=2) + "\n")
    return train_file, eval_file, tokenizer_dir, config_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the bundled small GLM-4.5-architecture model.")
    parser.add_argument("--out", default="runs/glm45-tiny-v5")
    parser.add_argument("--num-train", type=int, default=40000)
    parser.add_argument("--num-eval", type=int, default=100)
    parser.add_argument("--max-steps", type=int, default=3200)
    parser.add_argument("--max-minutes", type=float, default=86.0)
    parser.add_argument("--batch-tokens", type=int, default=6144)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--optimizer", default="muon")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--init-from", default=None, help="stage 2: continue from this trained model folder")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--copy-drill", type=float, default=0.1, help="share of extra copying drills")
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--piece-share", type=float, default=0.6,
                        help="share of made-up training words strung from the tokenizer's word pieces "
                             "(0: syllables only)")
    parser.add_argument("--install", action="store_true", help=f"copy the trained model into {ASSET_DIR}")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    out = Path(args.out)
    given_tokenizer = Path(args.init_from) if args.init_from else None
    train_file, eval_file, tokenizer_dir, config_file = prepare(out, args.num_train, args.num_eval, args.data_seed,
                                                                args.copy_drill, given_tokenizer, args.piece_share)
    config = TrainConfig(
        data=str(train_file), eval_data=str(eval_file), output_dir=str(out),
        init_config=None if args.init_from else str(config_file), model=args.init_from,
        tokenizer=str(tokenizer_dir), max_seq_len=1024, batch_tokens=args.batch_tokens, max_steps=args.max_steps,
        optimizer=args.optimizer, lr=args.lr, warmup_steps=args.warmup_steps, min_lr_ratio=0.05, mtp_weight=0.3,
        balance_gamma=1e-3, eval_every=100, save_every=50, log_every=10, max_minutes=args.max_minutes,
        threads=args.threads, seed=0,
    )
    summary = train(config)
    logger.info("training done: %s", summary)
    if args.install:
        install(summary["result"])
    return 0


def stage_main(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], Path],
               argv: list[str] | None) -> int:
    """A later stage's command: parse its arguments, run it, and with `--install` bundle its result."""
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = run(args)
    if args.install:
        install(result)
    return 0


def install(result: str | Path) -> None:
    """Copy a trained model folder's files into the package as the bundled model."""
    ASSET_DIR.mkdir(parents=True, exist_ok=True)
    for name in INSTALLED_FILES:
        shutil.copyfile(Path(result) / name, ASSET_DIR / name)  # contents only: the package's file modes stay
    logger.info("installed into %s", ASSET_DIR)


if __name__ == "__main__":
    raise SystemExit(main())
