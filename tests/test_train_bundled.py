"""The small model that ships with the package: it loads, and a short greedy chat with a tool gives a parseable
tool call (the full measured targets are in recipes/glm45-tiny/README.md)."""

from pathlib import Path

import torch
from glm45_tiny.evaluate import greedy_generate
from glm45_tiny.synthetic import CALCULATOR_TOOL, WEATHER_TOOL

import glm45
from glm45.chat import render_chat
from glm45.model import Glm4MoeForCausalLM
from glm45.parsers import parse_reasoning, parse_tool_calls
from glm45.tokenizer import Tokenizer

BUNDLED = Path(glm45.__file__).parent / "assets" / "glm45-tiny"


def test_bundled_model_has_the_hf_layout_and_an_mtp_layer():
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (BUNDLED / name).is_file(), name
    assert (BUNDLED / "model.safetensors").stat().st_size <= 40 * 2**20
    model = Glm4MoeForCausalLM.from_pretrained(BUNDLED, progress=False)
    assert model.mtp is not None and model.config.use_qk_norm and model.config.first_k_dense_replace == 1
    assert 5e6 <= sum(p.numel() for p in model.parameters()) <= 20e6


def test_bundled_model_calls_a_tool_greedily():
    model = Glm4MoeForCausalLM.from_pretrained(BUNDLED, dtype=torch.float32, progress=False).eval()
    tokenizer = Tokenizer.from_pretrained(BUNDLED)
    tools = [CALCULATOR_TOOL, WEATHER_TOOL]
    prompt = render_chat([{"role": "user", "content": "What's the weather in Vienna in celsius?"}], tools)
    new, stopped = greedy_generate(model, tokenizer.encode(prompt), set(tokenizer.eos_token_ids), 64)
    assert stopped and new[-1] == tokenizer.special_token_id("<|observation|>")
    _, content = parse_reasoning(tokenizer.decode(new[:-1], skip_special_tokens=False))
    _, calls = parse_tool_calls(content or "", tools)
    # A parseable call to the right tool with the tool's parameters; how often the argument values are exactly
    # right is measured by `python -m glm45_tiny.evaluate` (see recipes/glm45-tiny/README.md).
    assert len(calls) == 1 and calls[0]["name"] == "get_weather"
    assert set(calls[0]["arguments"]) == {"city", "unit"} and calls[0]["arguments"]["unit"] == "celsius"
