"""The bundled model's spelling stage: supervised training on capitalised requests, from the RL model, by one command.

    python -m glm45_tiny.spelling_recipe --model runs/glm45-tiny-rl/model --out runs/glm45-tiny-spelling --install

A request may start with its verb ("Translate warehouse, name cishsen-86."), and a capitalised word is other tokens
than the same word in lowercase: "Translate" is `T ran s l ate`, the tool's name `tr an s l ate _ …`. Before this stage
the model made every call to a tool it had not seen right when the request wrote the verb in lowercase (152 / 152 on
the 200 unseen-tool conversations of seed 2) and 9 of 48 when it wrote it capitalised; on made-up training-style verbs,
12 of 58. The name's first piece is then a guess ("kranslate_warehouse"). SFT and RL showed the skill too rarely
(a quarter of the random-tool requests): this stage shows it densely, in two kinds of conversation:
- tool requests whose verb is capitalised, to tools named by made-up words (as SFT drew them: strung from the
  tokenizer's pieces or syllables) and by the RL stage's English words;
- "write in lowercase" drills over capitalised made-up and English words.
So that nothing else is forgotten, the rest is the SFT training mix (where tool requests come with their tools) and
tool requests asked with no tools declared, which RL taught the model to answer without a call; here they are
declined in words ("I have no tool for that here, so I cannot do it."). No held-out word is
drawn: made-up words contain none (`WordPieces`, `pseudo_word`) and the English words are checked
(`rl_recipe.check_words`).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path
from typing import Any

from glm45_tiny.recipe import stage_main
from glm45_tiny.rl_recipe import RL_NOUNS, RL_VERBS, check_words
from glm45_tiny.synthetic import TOOL_NOUNS, TOOL_VERBS, ConversationGenerator, generate, write_jsonl

logger = logging.getLogger(__name__)

# Shares of the stage's conversations.
MIX = {"train": 0.5, "capitalised_tools": 0.2, "lowercase": 0.15, "no_tools": 0.15}
# Of the capitalised tool requests, the share whose tool is named by the RL stage's English words.
ENGLISH_SHARE = 0.3
DECLINES = ["I have no tool for that here, so I cannot do it.",
            "I cannot do that without a tool, and none is available.",
            "No tool is available for that, so I cannot help with it right now."]
LOWERCASE_REQUESTS = ["Write in lowercase: {text}", "Lowercase: {text}", "Make this lowercase: {text}",
                      "Please write this in lowercase: {text}"]


def _capitalised_tool_task(generator: ConversationGenerator, english: bool) -> dict[str, Any]:
    """A random-tool task whose request starts with the capitalised verb."""
    while True:
        task = generator.random_tool_task(words=(RL_VERBS, RL_NOUNS) if english else None)
        verb = task["tool"]["function"]["name"].split("_", 1)[0]
        if task["user"].startswith(verb.capitalize() + " "):
            return task


def _lowercase_task(generator: ConversationGenerator) -> dict[str, Any]:
    """Capitalised made-up and English words, to be written back in lowercase."""
    rng = generator.rng
    words = []
    for _ in range(rng.randint(3, 8)):
        roll = rng.random()
        if roll < 0.6:
            word = generator._made_up((1, 3))
        elif roll < 0.85:
            word = rng.choice(RL_VERBS + RL_NOUNS)
        else:
            word = rng.choice(TOOL_VERBS + TOOL_NOUNS)
        words.append(word.capitalize())
    text = " ".join(words)
    return {"user": rng.choice(LOWERCASE_REQUESTS).format(text=text), "answer": text.lower(),
            "plan": "I write the words in lowercase."}


def _no_tools_conversation(generator: ConversationGenerator, english: ConversationGenerator) -> dict[str, Any]:
    """A tool request (a fixed tool's, or an English-word tool's) asked with no tools declared, and declined."""
    rng = generator.rng
    if rng.random() < 0.25:
        task = english.random_tool_task(words=(RL_VERBS, RL_NOUNS))
    else:
        task = getattr(generator, rng.choice(["weather_task", "calculator_task", "convert_task"]))()
    plan = "The user asks for something that needs a tool, but none is available."
    conversation = generator.conversation({"user": task["user"], "answer": rng.choice(DECLINES), "plan": plan})
    conversation["tools"] = None
    conversation["meta"]["kind"] = "no_tools"
    return conversation


def build(out: Path, model: str, num: int, seed: int) -> Path:
    """Write the stage's `num` conversations (the shares of `MIX`, shuffled) to `out/train.jsonl`."""
    from glm45.tokenizer import Tokenizer

    check_words()
    rng = random.Random(seed)
    vocabulary = Tokenizer.from_pretrained(model).vocab
    counts = {kind: round(num * share) for kind, share in MIX.items()}
    conversations = generate(counts["train"], seed, "train", copy_drill=0.1, vocabulary=vocabulary)
    generator = ConversationGenerator(seed + 1, "train", vocabulary=vocabulary)
    english = ConversationGenerator(seed + 2, "train")
    for _ in range(counts["capitalised_tools"]):
        conversations.append(generator.conversation(_capitalised_tool_task(generator, rng.random() < ENGLISH_SHARE)))
    conversations += [generator.conversation(_lowercase_task(generator)) for _ in range(counts["lowercase"])]
    conversations += [_no_tools_conversation(generator, english) for _ in range(counts["no_tools"])]
    rng.shuffle(conversations)
    return write_jsonl(conversations, out / "train.jsonl")


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Spelling stage of the bundled model (capitalised requests).")
    parser.add_argument("--model", required=True, help="the RL model (`glm45_tiny.rl_recipe`'s result)")
    parser.add_argument("--out", default="runs/glm45-tiny-spelling")
    parser.add_argument("--num", type=int, default=30000, help="conversations drawn")
    parser.add_argument("--max-steps", type=int, default=1100)
    parser.add_argument("--max-minutes", type=float, default=32.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=20)
    parser.add_argument("--install", action="store_true", help="copy the result into the package as the bundled model")
    return parser


def run(args: argparse.Namespace) -> Path:
    """Write the conversations and train with `args` (of `parser()`); returns the trained model's folder."""
    from glm45.train.config import TrainConfig
    from glm45.train.trainer import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_file = build(out, args.model, args.num, args.seed)
    eval_file = write_jsonl(generate(100, seed=1, split="heldout"), out / "eval.jsonl")
    config = TrainConfig(
        data=str(train_file), eval_data=str(eval_file), output_dir=str(out), model=args.model,
        max_seq_len=1024, batch_tokens=6144, max_steps=args.max_steps, optimizer="muon", lr=args.lr,
        warmup_steps=20, min_lr_ratio=0.05, mtp_weight=0.3, balance_gamma=1e-3, eval_every=100, save_every=50,
        log_every=10, max_minutes=args.max_minutes, threads=args.threads, seed=args.seed)
    summary = train(config)
    logger.info("training done: %s", summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return Path(summary["result"])


def main(argv: list[str] | None = None) -> int:
    return stage_main(parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
