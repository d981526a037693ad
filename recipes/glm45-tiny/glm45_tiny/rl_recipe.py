"""The bundled model's RL stage: GRPO on tool-use prompts with the reward of `glm45_tiny.rewards`, by one command.

    python -m glm45_tiny.rl_recipe --model runs/glm45-tiny-v5/model --out runs/glm45-tiny-rl --install

SFT (`recipe.py`) taught the protocol from reference answers; two things it never showed are what RL fixes here:
- a request that needs a tool when *no* tool is declared: the model had only ever seen such requests with tools, and
  wrote a `<tool_call>` anyway ("What's the weather like in Paris?" → a call to get_weather with "Helsinki");
- tools named with real English words: training tools were made-up words or a few fixed verbs and nouns, so names of
  English words it had not seen were copied badly ("summarize" → "shmarize").

The prompts (`prompt_rows`) mix four kinds: the training split's own tasks as SFT drew them (tools declared when the
task has them; chat), tool tasks with tools named by `RL_VERBS`/`RL_NOUNS` (English words that are neither training
words nor the evaluation's held-out words — the held-out tools stay unseen), tool requests asked with no tools
declared (English-word tool tasks, and the training split's weather, calculator and conversion tasks), where the
right answer has no call (each followed by the same request with its tools declared, so that the model learns to
decline by the tool list, not by the request: without the twins, 360 steps taught it to answer some calculator
requests with a greeting even with the calculator declared), and the answer after a tool's result, which must
mention the result's values. Cities are the training split's.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path
from typing import Any

from glm45_tiny.synthetic import (
    _HELDOUT_WORDS,
    TOOL_NOUNS,
    TOOL_VERBS,
    ConversationGenerator,
)

logger = logging.getLogger(__name__)

RL_VERBS = ["assign", "validate", "compress", "deploy", "export", "publish", "refund", "register", "release",
            "resolve", "submit", "transfer", "upload", "download", "monitor", "notify", "calculate", "analyze",
            "estimate", "compare", "inspect", "repair", "replace", "install", "encrypt", "unlock", "launch", "predict",
            "retrieve", "subscribe", "confirm", "reject", "measure", "print", "scan", "sort", "filter", "share",
            "rotate", "reset", "pause", "stream", "render", "audit", "prepare", "promote", "suspend", "water", "paint",
            "harvest"]
RL_NOUNS = ["customer", "employee", "vehicle", "garden", "bridge", "library", "festival", "planet", "engine", "printer",
            "battery", "license", "document", "project", "budget", "report", "server", "camera", "sensor", "wallet",
            "concert", "stadium", "airport", "island", "castle", "hospital", "bakery", "tunnel", "rocket", "trophy",
            "insurance", "receipt", "coupon", "warranty", "certificate", "kitchen", "bicycle", "helmet", "blanket",
            "volcano", "forest", "river", "mountain", "theater", "pharmacy", "market", "telescope", "canvas", "puzzle",
            "ladder", "lantern", "magnet", "orchard", "penguin", "dolphin", "mortgage", "pension", "salary", "diploma",
            "ambulance"]
# Shares of the prompt kinds: the training mix as is, English-word tools, tool requests with no tools declared, and
# answers from a tool's result (the turn after `<|observation|>`, so that RL keeps that skill too).
MIX = {"train": 0.25, "english_tools": 0.30, "no_tools": 0.35, "answers": 0.10}
# The requests asked with no tools declared: a quarter of them English-word tool tasks, the rest the training split's
# own tasks of these tools (after a first RL recipe that drew them from every training-split tool task, the calls
# left without tools were mostly weather requests).
NO_TOOLS_ENGLISH_SHARE = 0.25
NO_TOOLS_KINDS = {"get_weather", "calculator", "convert_units"}


def check_words() -> None:
    clash = [w for w in RL_VERBS + RL_NOUNS if any(h in w or w in h for h in _HELDOUT_WORDS)]
    known = [w for w in RL_VERBS + RL_NOUNS if w in TOOL_VERBS or w in TOOL_NOUNS]
    if clash or known:
        raise ValueError(f"RL words must be new: held-out clashes {clash}, training words {known}")


def _row(conversation: dict[str, Any], tools: bool = True) -> dict[str, Any]:
    messages = conversation["messages"]
    first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
    meta = conversation["meta"]
    wanted = meta.get("call") if tools and conversation["tools"] else None
    return {"messages": messages[:first_user + 1], "tools": conversation["tools"] if tools else None,
            "enable_thinking": conversation["enable_thinking"], "expected_call": wanted,
            "kind": ("no_tools:" if not tools else "") + meta["kind"]}


def _answer_row(conversation: dict[str, Any]) -> dict[str, Any]:
    """The turn after the tool's result: the prompt ends with the `tool` message; the answer must mention its values."""
    messages = conversation["messages"]
    result = next(i for i, m in enumerate(messages) if m["role"] == "tool")
    return {"messages": messages[:result + 1], "tools": conversation["tools"],
            "enable_thinking": conversation["enable_thinking"], "expected_call": None,
            "must_mention": conversation["meta"]["must_mention"], "kind": "answer:" + conversation["meta"]["kind"]}


def prompt_rows(num: int, seed: int) -> list[dict[str, Any]]:
    """`num` prompt rows of the mix above (deterministic for a seed)."""
    check_words()
    rng = random.Random(seed)
    train = ConversationGenerator(seed, "train")
    english = ConversationGenerator(seed + 1, "train")
    rows = []
    while len(rows) < num:
        kind = rng.choices(list(MIX), weights=list(MIX.values()))[0]
        if kind == "train":
            rows.append(_row(train.conversation()))
            continue
        if kind == "answers":
            conversation = train.conversation()
            while "call" not in conversation["meta"]:
                conversation = train.conversation()
            rows.append(_answer_row(conversation))
            continue
        if kind == "english_tools" or rng.random() < NO_TOOLS_ENGLISH_SHARE:
            conversation = english.conversation(english.random_tool_task(words=(RL_VERBS, RL_NOUNS)))
        else:
            conversation = train.conversation()
            while "call" not in conversation["meta"] or conversation["meta"]["kind"] not in NO_TOOLS_KINDS:
                conversation = train.conversation()
        rows.append(_row(conversation, tools=kind != "no_tools"))
        if kind == "no_tools":  # its twin with the tools declared: declining is learnt against calling
            rows.append(_row(conversation))
    return rows[:num]


def write_rows(rows: list[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="GRPO stage of the bundled model (tool use).")
    parser.add_argument("--model", required=True, help="the SFT model (`glm45_tiny.recipe`'s result)")
    parser.add_argument("--out", default="runs/glm45-tiny-rl")
    parser.add_argument("--num-prompts", type=int, default=4000)
    parser.add_argument("--max-steps", type=int, default=360)
    parser.add_argument("--max-minutes", type=float, default=52.0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--optimizer", default="muon")
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--prompts-per-step", type=int, default=16)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--install", action="store_true", help="copy the result into the package as the bundled model")
    return parser


def run(args: argparse.Namespace) -> Path:
    """Write the prompts and run GRPO with `args` (of `parser()`); returns the trained model's folder."""
    from glm45.train.rl import rl
    from glm45.train.rl_config import RLConfig

    out = Path(args.out)
    prompts = write_rows(prompt_rows(args.num_prompts, 1000 + args.seed), out / "prompts.jsonl")
    config = RLConfig(
        data=str(prompts), model=args.model, output_dir=str(out), reward="glm45_tiny.rewards:tool_use",
        num_generations=args.num_generations, prompts_per_step=args.prompts_per_step, max_completion_length=160,
        temperature=1.0, beta=args.beta, lr=args.lr, optimizer=args.optimizer, warmup_steps=5, min_lr_ratio=1.0,
        max_steps=args.max_steps, max_minutes=args.max_minutes, batch_tokens=8192, mtp_weight=0.3,
        balance_gamma=1e-3, rollout_speculative_tokens=1, rollout_max_num_seqs=128, save_every=10, export_every=50,
        threads=args.threads, seed=args.seed, resume=args.resume)
    summary = rl(config)
    logger.info("RL done: %s", summary)
    return Path(summary["result"])


def main(argv: list[str] | None = None) -> int:
    from glm45_tiny.recipe import stage_main

    return stage_main(parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
