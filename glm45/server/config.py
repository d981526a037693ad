"""What `glm45 serve` is configured with, and its command-line flags, generated from the dataclasses.

The engine's flags come from `EngineConfig`, the server's own from `ServerConfig` below (`glm45.cli_args`: one
kebab-case flag per field). Names are vLLM's wherever the meaning is the same
(`--max-model-len`, `--served-model-name`, `--enable-auto-tool-choice`, …), and the spellings of
speculative decoding that GLM-4.5 recipes use are all accepted: vLLM's `--speculative-config` JSON,
SGLang's `--speculative-algorithm/-num-steps/-eagle-topk/-num-draft-tokens`, and the engine's own
`--num-speculative-tokens`.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glm45.cli_args import add_dataclass_arguments, arg, dataclass_from_args, json_object
from glm45.config import EngineConfig

MTP_METHODS = ("mtp", "glm4_moe_mtp", "deepseek_mtp", "nextn", "eagle")


@dataclass
class ServerConfig:
    """How the HTTP server runs (the engine's settings are in `EngineConfig`)."""

    host: str = arg("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = arg(8000, "TCP port to listen on")
    served_model_name: list[str] | None = arg(
        None, "model name(s) clients use; default: the model folder name. Names with * or ? are patterns that "
              "accept any matching name (e.g. 'claude-*' for Claude Code, '*' for any); the first name is listed")
    lora_modules: list[str] | None = arg(None, "LoRA adapters served by name: name=path, or vLLM's JSON "
                                               '\'{"name": ..., "path": ...}\' (turns on --enable-lora)')
    api_key: str | None = arg(None, "require `Authorization: Bearer KEY` or `x-api-key: KEY` on /v1/* "
                                    "(or $GLM45_API_KEY)")
    chat_template: str | None = arg(None, "a jinja chat template (file or text) instead of the built-in one")
    default_chat_template_kwargs: dict[str, Any] | None = arg(
        None, 'chat template kwargs for every request unless it sets them, e.g. \'{"enable_thinking": false}\'')
    tool_call_parser: str = arg("glm45", "glm45 | none")
    reasoning_parser: str = arg("glm45", "glm45 | none (reasoning stays in the content)")
    enable_auto_tool_choice: bool = arg(True, 'let the model decide to call tools (tool_choice "auto")')
    tool_call_constraint: str = arg(
        "name", 'off | name | full: with tool_choice "auto", once the model opens <tool_call>, constrain the name '
                "to a declared tool, chosen whole by the model's likelihood (name), and its arguments to the tool's "
                "schema too (full)")
    max_request_body_bytes: int = arg(16 * 2**20, "larger request bodies are refused with 413")
    request_body_timeout: float = arg(30.0, "seconds to wait for each piece of a request body before a 408")
    shutdown_timeout: float = arg(60.0, "seconds SIGTERM waits for in-flight requests to finish")
    uvicorn_log_level: str = arg("info", "log level of uvicorn's own loggers")

    def __post_init__(self) -> None:
        if self.tool_call_parser not in ("glm45", "none"):
            raise ValueError(f"tool_call_parser must be 'glm45' or 'none', got {self.tool_call_parser!r}")
        if self.tool_call_constraint not in ("off", "name", "full"):
            raise ValueError(f"tool_call_constraint must be off, name or full, got {self.tool_call_constraint!r}")
        if self.reasoning_parser not in ("glm45", "none"):
            raise ValueError(f"reasoning_parser must be 'glm45' or 'none', got {self.reasoning_parser!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in [1, 65535], got {self.port}")
        if not self.request_body_timeout > 0:
            raise ValueError(f"request_body_timeout must be > 0, got {self.request_body_timeout}")
        if self.max_request_body_bytes < 1:
            raise ValueError(f"max_request_body_bytes must be ≥ 1, got {self.max_request_body_bytes}")
        if self.api_key is None:
            self.api_key = os.environ.get("GLM45_API_KEY") or None

    def load_chat_template(self) -> str | None:
        """The template text: `chat_template` is a path when such a file exists, else the template itself."""
        if self.chat_template is None:
            return None
        path = Path(self.chat_template)
        try:
            if path.is_file():
                return path.read_text(encoding="utf-8")
        except OSError:  # a long template text is not a valid path
            pass
        if "{" not in self.chat_template:
            raise ValueError(f"chat template {self.chat_template!r} is neither a file nor a jinja template")
        return self.chat_template


# ---------------------------------------------------------------------------------------------------
# The serve command's flags


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_positional", nargs="?", metavar="MODEL",
                        help="a local model folder (Hugging Face layout); default: the bundled small model")
    parser.add_argument("--model", default=None, help="the model folder (same as the positional MODEL)")
    add_dataclass_arguments(parser, EngineConfig, skip=("model",))
    add_dataclass_arguments(parser, ServerConfig)
    spec = parser.add_argument_group("speculative decoding (other spellings of --num-speculative-tokens)")
    spec.add_argument("--speculative-config", type=json_object, default=None, metavar="JSON",
                      help='vLLM style, e.g. \'{"method": "mtp", "num_speculative_tokens": 1}\'')
    spec.add_argument("--speculative-num-steps", type=int, default=None,
                      help="SGLang style: MTP draft tokens per step")
    spec.add_argument("--speculative-algorithm", default=None, help="SGLang style: EAGLE/NEXTN (both mean MTP)")
    spec.add_argument("--speculative-num-draft-tokens", type=int, default=None,
                      help="SGLang style: draft tokens per step plus one (the verified token)")
    spec.add_argument("--speculative-eagle-topk", type=int, default=None,
                      help="SGLang style: must be 1 (the MTP layer drafts a single chain)")


def configs_from_args(args: argparse.Namespace) -> tuple[EngineConfig, ServerConfig]:
    if args.model and args.model_positional and args.model != args.model_positional:
        raise ValueError(f"two different models given: {args.model_positional!r} and --model {args.model!r}")
    model = args.model or args.model_positional
    num_speculative_tokens = args.num_speculative_tokens
    if args.speculative_config is not None:
        method = str(args.speculative_config.get("method", "mtp")).lower()
        if method not in MTP_METHODS:
            raise ValueError(f"--speculative-config method {method!r} is not supported; GLM-4.5 drafts with its "
                             f"MTP layer: use one of {', '.join(MTP_METHODS)}")
        num_speculative_tokens = int(args.speculative_config.get("num_speculative_tokens", 1))
    if args.speculative_eagle_topk not in (None, 1):
        raise ValueError(f"--speculative-eagle-topk {args.speculative_eagle_topk}: MTP drafts a single chain; use 1")
    if args.speculative_num_draft_tokens is not None:
        num_speculative_tokens = args.speculative_num_draft_tokens - 1
        if args.speculative_num_steps not in (None, num_speculative_tokens):
            raise ValueError(f"--speculative-num-draft-tokens {args.speculative_num_draft_tokens} must be "
                             f"--speculative-num-steps + 1 = {args.speculative_num_steps + 1} for a single chain")
    if args.speculative_num_steps is not None:
        num_speculative_tokens = args.speculative_num_steps
    elif args.speculative_algorithm is not None and not num_speculative_tokens:
        num_speculative_tokens = 1
    engine_config = dataclass_from_args(EngineConfig, args, model=model,
                                        num_speculative_tokens=num_speculative_tokens)
    server_config = dataclass_from_args(ServerConfig, args)
    if server_config.lora_modules:
        engine_config.enable_lora = True
        engine_config.max_loras = max(engine_config.max_loras, len(lora_requests(server_config.lora_modules)))
    return engine_config, server_config


def lora_requests(modules: list[str] | None) -> list:
    """`--lora-modules` entries (name=path or vLLM's JSON) → `LoRARequest`s with ids 1, 2, …"""
    import json

    from glm45.engine.lora import LoRARequest

    requests = []
    for i, entry in enumerate(modules or [], start=1):
        if entry.lstrip().startswith("{"):
            try:
                spec = json.loads(entry)
                name, path = spec["name"], spec["path"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"--lora-modules {entry!r}: JSON needs 'name' and 'path' ({e})") from None
        else:
            name, sep, path = entry.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--lora-modules {entry!r}: expected name=path or a JSON object")
        if not Path(path).is_dir():
            raise ValueError(f"--lora-modules {name}: no adapter folder {path}")
        requests.append(LoRARequest(name, i, path))
    names = [r.lora_name for r in requests]
    if len(set(names)) != len(names):
        raise ValueError(f"--lora-modules names must be distinct, got {names}")
    return requests
