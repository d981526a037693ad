"""Shared test material for the protocol tests: a tiny GLM-4.5-style tokenizer and a multilingual corpus."""

from pathlib import Path

from glm45_tiny.tokenizer_build import build_tokenizer

from glm45.tokenizer import Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Tokenizers split text into pieces.",
    "我买的莲藕里面为什么有孔？莲藕的孔是通气组织，帮助植物在水下呼吸。北京今天天气很好。",
    "Привет, мир! Как дела? Съешь же ещё этих мягких французских булок.",
    "Γειά σου κόσμε. こんにちは世界、元気ですか。안녕하세요 세계. مرحبا بالعالم. שלום עולם.",
    "naïve café résumé — “quotes” and ‘apostrophes’… 😀😃🎉👍🏽👨‍👩‍👧‍👦🇫🇷 ✓ ∑ ∞ ≠ ≤",
    "<think>Let me think step by step.</think>\nThe answer is 42.",
    "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>北京</arg_value>\n</tool_call>",
    'def f(x):\n    return {"a": [1, 2, 3], "b": None}  # code\n\tindented\r\n',
]


def build_tiny_tokenizer(folder: Path, vocab_size: int = 800) -> Tokenizer:
    build_tokenizer(CORPUS * 20, vocab_size, folder)
    return Tokenizer.from_pretrained(folder)
