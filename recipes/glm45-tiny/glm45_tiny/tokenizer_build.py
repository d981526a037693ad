"""Train a small byte-level BPE tokenizer that speaks the GLM-4.5 protocol.

The bundled small model and the tests need a tokenizer that behaves like GLM-4.5's own (byte-level BPE,
no BOS, the same added tokens with the same `special` flags, the same chat template) but is small enough
to train in a second on a toy corpus. `build_tokenizer` writes `tokenizer.json` + `tokenizer_config.json`
in the Hugging Face layout, so both `glm45.tokenizer.Tokenizer` and transformers' `AutoTokenizer` load it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from glm45.chat import GLM45_CHAT_TEMPLATE

# The released GLM-4.5 added tokens (ids 151329–151364 there), in order, with their `special` flags.
# `<think>`, `<tool_call>` and the argument tags are not special, so they survive skip_special_tokens;
# `/nothink` is special.
GLM45_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("[MASK]", True),
    ("[gMASK]", True),
    ("[sMASK]", True),
    ("<sop>", True),
    ("<eop>", True),
    ("<|system|>", True),
    ("<|user|>", True),
    ("<|assistant|>", True),
    ("<|observation|>", True),
    ("<|begin_of_image|>", True),
    ("<|end_of_image|>", True),
    ("<|begin_of_video|>", True),
    ("<|end_of_video|>", True),
    ("<|begin_of_audio|>", True),
    ("<|end_of_audio|>", True),
    ("<|begin_of_transcription|>", True),
    ("<|end_of_transcription|>", True),
    ("<|code_prefix|>", True),
    ("<|code_middle|>", True),
    ("<|code_suffix|>", True),
    ("<think>", False),
    ("</think>", False),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<arg_key>", False),
    ("</arg_key>", False),
    ("<arg_value>", False),
    ("</arg_value>", False),
    ("/nothink", True),
    ("<|begin_of_box|>", False),
    ("<|end_of_box|>", False),
    ("<|image|>", False),
    ("<|video|>", False),
)

# GLM-4's pre-tokenisation split (GPT-4 style: contractions, letters, 1–3 digit groups, punctuation runs).
GLM4_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# A split for small models that must copy: a word is the same tokens wherever it stands. Spaces are their own
# pieces (GLM-4's split glues one to the next word, so " Hobart" in a request and "Hobart" in a tool argument
# share no first token) and digits are single (so "12345" and " 12345" are the same five tokens).
COPY_SPLIT_PATTERN = r"\p{L}+|\p{N}|[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_MIN_BPE_VOCAB = 256  # one token per byte, so every text can be encoded


def build_tokenizer(corpus_texts: Iterable[str], vocab_size: int, out_dir: str | Path,
                    split_pattern: str = GLM4_SPLIT_PATTERN) -> Path:
    """Train a byte-level BPE on `corpus_texts` and write a GLM-4.5-style tokenizer into `out_dir`.

    `vocab_size` is the total size including the 36 GLM-4.5 added tokens, which take the last ids in
    the released order. The trainer may stop short of it on a small corpus; the written tokenizer is
    never larger. `split_pattern` is the pre-tokenisation regex: GLM-4's by default, or
    `COPY_SPLIT_PATTERN`. Returns `out_dir`.
    """
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    bpe_vocab = vocab_size - len(GLM45_ADDED_TOKENS)
    if bpe_vocab < _MIN_BPE_VOCAB:
        raise ValueError(
            f"vocab_size {vocab_size} is too small: it must be at least "
            f"{_MIN_BPE_VOCAB + len(GLM45_ADDED_TOKENS)} (256 byte tokens + {len(GLM45_ADDED_TOKENS)} added tokens)"
        )
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split_pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(corpus_texts, trainer=trainer)

    # One at a time, so the ids follow the released order across special and non-special tokens.
    for content, special in GLM45_ADDED_TOKENS:
        token = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False,
                           single_word=False)
        (tok.add_special_tokens if special else tok.add_tokens)([token])

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "added_tokens_decoder": {
            str(tok.token_to_id(content)): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": special,
            }
            for content, special in GLM45_ADDED_TOKENS
        },
        "additional_special_tokens": [content for content, special in GLM45_ADDED_TOKENS if special],
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "remove_space": False,
        "model_max_length": 128000,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": GLM45_CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n",
                                                 encoding="utf-8")
    return out
