"""A synthetic GLM-4.5-style tokenizer of exactly a model's vocabulary size, for converting random-weight
checkpoints to GGUF.

llama.cpp's `convert_hf_to_gguf.py` reads the tokenizer beside the weights: it needs a byte-level BPE
(`tokenizer.json` with merges), GLM-4.5's added tokens by their text (`[gMASK]`, `<|user|>`,
`<|observation|>`, …) and ids below `vocab_size`. The benchmark models are random, so nothing needs to be
learnt: the 256 byte tokens come first (id = byte value), then merges made by concatenating two tokens that
already exist (a fixed pseudo-random walk, so every build is byte-identical), then GLM-4.5's added tokens in
their released order starting at the config's `<|endoftext|>` id (its first `eos_token_id`), then reserved
control tokens until the vocabulary is full. The benchmarks feed token ids, so the merges' quality is moot;
what matters is that every id exists and that the special tokens sit where the config says.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

# GLM-4.5's pre-tokenizer split and added tokens are written down once, in the bundled model's recipe.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes" / "glm45-tiny"))
from glm45_tiny.tokenizer_build import GLM4_SPLIT_PATTERN, GLM45_ADDED_TOKENS  # noqa: E402

NUM_BYTE_TOKENS = 256


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order (what the ByteLevel pre-tokenizer emits)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(NUM_BYTE_TOKENS):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(NUM_BYTE_TOKENS + extra)
            extra += 1
    return [chars[b] for b in range(NUM_BYTE_TOKENS)]


def synthetic_merges(num_merges: int, seed: int = 0) -> list[tuple[str, str]]:
    """`num_merges` BPE merges, each joining two existing tokens into a new one. The right-hand side comes
    from the first 512 tokens, which keeps the tokens short (a few bytes) as in a real vocabulary."""
    rng = random.Random(seed)
    tokens = byte_alphabet()
    seen = set(tokens)
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        left = tokens[rng.randrange(len(tokens))]
        right = tokens[rng.randrange(min(len(tokens), 512))]
        if left + right in seen:
            continue
        seen.add(left + right)
        tokens.append(left + right)
        merges.append((left, right))
    return merges


def build_synthetic_tokenizer(vocab_size: int, added_start: int, out_dir: str | Path, seed: int = 0) -> Path:
    """Write `tokenizer.json` + `tokenizer_config.json` with exactly `vocab_size` tokens into `out_dir`:
    ids [0, added_start) byte-level BPE, then GLM-4.5's 36 added tokens, then `<|reserved_i|>` to the end."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    num_added = len(GLM45_ADDED_TOKENS)
    if not NUM_BYTE_TOKENS <= added_start <= vocab_size - num_added:
        raise ValueError(f"added_start must be in [{NUM_BYTE_TOKENS}, vocab_size - {num_added}] "
                         f"= [{NUM_BYTE_TOKENS}, {vocab_size - num_added}], got {added_start}")
    merges = synthetic_merges(added_start - NUM_BYTE_TOKENS, seed)
    vocab = {token: i for i, token in enumerate(byte_alphabet())}
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GLM4_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    reserved = [(f"<|reserved_{i}|>", True) for i in range(vocab_size - added_start - num_added)]
    added = list(GLM45_ADDED_TOKENS) + reserved
    for content, special in added:  # one at a time, so the ids follow the list across special and not
        token = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
        (tok.add_special_tokens if special else tok.add_tokens)([token])
    if tok.get_vocab_size() != vocab_size or tok.token_to_id("<|endoftext|>") != added_start:
        raise RuntimeError(f"synthetic tokenizer came out with {tok.get_vocab_size()} tokens, wanted {vocab_size}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "added_tokens_decoder": {
            str(added_start + i): {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                                   "single_word": False, "special": special}
            for i, (content, special) in enumerate(added)
        },
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "remove_space": False,
        "model_max_length": 128000,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n",
                                                 encoding="utf-8")
    return out


def add_synthetic_tokenizer(model_dir: str | Path) -> Path:
    """Give a checkpoint folder a tokenizer matching its config (no-op when it has one); checks that the
    config's end-of-sequence ids are GLM-4.5's `<|endoftext|>`, `<|user|>` and `<|observation|>` there."""
    model_dir = Path(model_dir)
    if (model_dir / "tokenizer.json").is_file():
        return model_dir
    config = json.loads((model_dir / "config.json").read_text())
    eos = config["eos_token_id"]
    eos = [eos] if isinstance(eos, int) else list(eos)
    texts = [content for content, _ in GLM45_ADDED_TOKENS]
    start = eos[0]
    expected = [start + texts.index(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    if eos != expected:
        raise ValueError(f"{model_dir}: eos_token_id {eos} is not GLM-4.5's layout {expected} "
                         "(<|endoftext|>, <|user|>, <|observation|> from the first id on)")
    return build_synthetic_tokenizer(config["vocab_size"], start, model_dir)
