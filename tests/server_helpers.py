"""Test material for the server: tiny models with a GLM-4.5-style tokenizer, and a real uvicorn server on a
loopback port in a background thread.

Two models:
- `save_random_model`: random weights. Its text is gibberish, which is all the protocol tests need
  (shapes, streaming against non-streaming, stop, n, usage, concurrency, aborts).
- `save_scripted_model`: weights built so that greedy decoding follows a script. Attention and MLPs
  write nothing to the residual stream, so the last hidden state is the normalised embedding of the current
  token; embeddings are one-hot (a slot per scripted token, slot 0 for every other token) and `lm_head` maps
  the slot of each scripted token to the next token of the script, and slot 0 to `<|endoftext|>`. The
  next token is then a pure function of the current one, so a script works as long as its tokens are all
  distinct — which is why it writes its tool call without the optional newlines:
      <|assistant|> → <think>The quick</think>Tokenizers<tool_call>get_weather<arg_key>city</arg_key>
                       <arg_value>北京</arg_value></tool_call><|observation|>
  A thinking-off prompt ends with `</think>`, so it skips the reasoning and goes on from there; a prompt
  prefilled with `<tool_call>` (tool_choice "required") goes on from there too, and one prefilled with
  `<tool_call>get_weather\n` (a named tool_choice) maps `\n` to `<arg_key>`. This is how the server's tool-
  call parsing and streaming are tested end to end with a real model run, without any trained model.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import torch
import uvicorn
from protocol_fixtures import build_tiny_tokenizer

from glm45.config import EngineConfig, ModelConfig
from glm45.engine.engine import LLMEngine
from glm45.model import Glm4MoeForCausalLM
from glm45.server.app import create_app
from glm45.server.config import ServerConfig

SCRIPT_REASONING = "The quick"
SCRIPT_CONTENT = "Tokenizers"
SCRIPT_CITY = "北京"
SCRIPT_PIECES = ["<|assistant|>", "<think>", SCRIPT_REASONING, "</think>", SCRIPT_CONTENT, "<tool_call>", "get_weather",
                 "<arg_key>", "city", "</arg_key>", "<arg_value>", SCRIPT_CITY, "</arg_value>", "</tool_call>",
                 "<|observation|>"]
# What the script answers after its reasoning, as plain text (no tools given, so no call is parsed out of it).
SCRIPT_ANSWER = "".join(SCRIPT_PIECES[4:-1])
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CLOCK_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def _config(tokenizer, hidden_size: int, num_layers: int, with_mtp: bool = False) -> ModelConfig:
    return ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden_size, intermediate_size=128,
                       moe_intermediate_size=32, num_hidden_layers=num_layers, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, first_k_dense_replace=1, n_routed_experts=8,
                       num_experts_per_tok=2, use_qk_norm=True, num_nextn_predict_layers=int(with_mtp),
                       max_position_embeddings=2048, eos_token_id=tokenizer.eos_token_ids)


def save_random_model(folder: Path, with_mtp: bool = False) -> Path:
    tokenizer = build_tiny_tokenizer(folder)
    torch.manual_seed(0)
    model = Glm4MoeForCausalLM(_config(tokenizer, hidden_size=64, num_layers=2, with_mtp=with_mtp))
    model.init_weights(std=0.1)
    model.save_pretrained(folder)
    return folder


def save_scripted_model(folder: Path, pieces: list[str] = SCRIPT_PIECES) -> Path:
    """A model whose greedy answer follows `pieces` (the module docstring explains how); its tokens must be
    distinct, and the script ends where its last token is followed by `<|endoftext|>`."""
    tokenizer = build_tiny_tokenizer(folder)
    script = [t for piece in pieces for t in tokenizer.encode(piece)]
    if len(set(script)) != len(script):
        raise ValueError(f"the script repeats a token, so it cannot be a function of the current token: {script}")
    config = _config(tokenizer, hidden_size=64, num_layers=1)
    if len(script) + 1 > config.hidden_size:
        raise ValueError("the script needs one embedding slot per token plus one")
    torch.manual_seed(0)
    model = Glm4MoeForCausalLM(config)
    model.init_weights(std=0.02)
    end = tokenizer.special_token_id("<|endoftext|>")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        embed.zero_()
        head.zero_()
        embed[:, 0] = 1.0
        head[end, 0] = 1.0
        successors = dict(zip(script, script[1:], strict=False))
        successors[tokenizer.encode("\n")[0]] = tokenizer.special_token_id("<arg_key>")
        for slot, (token, following) in enumerate(successors.items(), start=1):
            embed[token] = 0.0
            embed[token, slot] = 1.0
            head[following, slot] = 1.0
    model.save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """A real uvicorn server for `folder` on 127.0.0.1 in a daemon thread; `base_url` ends in /v1."""

    def __init__(self, folder: Path, server_config: ServerConfig | None = None, **engine_args):
        engine_args = {"dtype": "float32", "device": "cpu", "max_model_len": 1024, "num_gpu_blocks_override": 512,
                       **engine_args}
        self.engine = LLMEngine(EngineConfig(model=str(folder), **engine_args))
        self.port = free_port()
        self.config = server_config or ServerConfig()
        self.app = create_app(self.engine, self.config, self.config.served_model_name or ["tiny"])
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 60) -> None:
    """Wait for a `glm45 serve` subprocess to answer /health, failing early if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"glm45 serve exited early: {process.stderr.read()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("glm45 serve did not become healthy")
