"""The `glm45` command line: one entry point with subcommands.

    glm45 info MODEL      load a checkpoint and print its architecture and parameter counts
    glm45 quantize MODEL  save a checkpoint with fp8, int8 or int4 weights
    glm45 plan MODEL      the memory a model needs (weights, KV cache, activations) and the GPUs that fit it
    glm45 serve [MODEL]   the OpenAI-compatible server (vLLM's flags); default: the bundled small model
    glm45 chat [MODEL]    an interactive chat in the terminal
    glm45 eval [MODEL]    perplexity and mean token log-likelihood of held-out texts or conversations
    glm45 train           fine-tune (full or LoRA) or train from scratch on JSONL conversations
    glm45 rl              reinforcement learning (GRPO) with rollouts from glm45's own engine
    glm45 merge           fold a LoRA adapter into an HF checkpoint
    glm45 export MODEL    write a checkpoint for another runtime (GGUF for llama.cpp and Ollama)
"""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger(__name__)


def init_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cmd_info(args: argparse.Namespace) -> int:
    from glm45.model import Glm4MoeForCausalLM

    model = Glm4MoeForCausalLM.from_pretrained(args.model, dtype=args.dtype)
    config = model.config
    total = sum(p.numel() for p in model.parameters())
    mtp = sum(p.numel() for p in model.mtp.parameters()) if model.mtp is not None else 0
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n and not n.startswith("mtp."))
    per_expert = experts / max(1, config.num_moe_layers * config.n_routed_experts)
    active = total - mtp - experts + per_expert * config.num_moe_layers * config.num_experts_per_tok
    print(f"model:            {args.model}")
    print(f"dtype:            {model.dtype}")
    print(f"layers:           {config.num_hidden_layers} ({config.first_k_dense_replace} dense), "
          f"hidden {config.hidden_size}, heads {config.num_attention_heads}/{config.num_key_value_heads} "
          f"× {config.head_dim}, QK-norm {config.use_qk_norm}")
    print(f"experts:          {config.n_routed_experts} routed (top-{config.num_experts_per_tok}, "
          f"groups {config.topk_group}/{config.n_group}) + {config.n_shared_experts} shared, "
          f"scaling {config.routed_scaling_factor}")
    print(f"parameters:       {total / 1e6:.2f}M total, {active / 1e6:.2f}M active per token, "
          f"{mtp / 1e6:.2f}M in the MTP layer{'' if model.mtp is not None else ' (none)'}")
    print(f"weight bytes:     {sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20:.1f} MiB")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    """Load a checkpoint quantized (tensor by tensor, so memory stays near the packed size) and save it."""
    import shutil
    from pathlib import Path

    from glm45.model import Glm4MoeForCausalLM
    from glm45.quant.modules import QuantLinear
    from glm45.quant.scheme import quantization_config

    head = args.lm_head_quantization
    if args.calibration is None:
        model = Glm4MoeForCausalLM.from_pretrained(args.model, dtype=args.dtype, quantization=args.to,
                                                   lm_head_quantization=head)
    else:
        model = calibrated_model(args)
    head_fmt = model.lm_head.packed.format if isinstance(model.lm_head, QuantLinear) else None  # as it was loaded
    model.config.quantization_config = quantization_config(args.to, head_fmt,
                                                           "gptq" if args.calibration else None)
    model.save_pretrained(args.out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (Path(args.model) / name).is_file():
            shutil.copy(Path(args.model) / name, Path(args.out) / name)
    size = sum(p.stat().st_size for p in Path(args.out).glob("*.safetensors"))
    heads = f" (LM heads in {head})" if head not in (None, args.to) else ""
    print(f"saved {args.model} in {args.to}{heads} to {args.out} ({size / 2**20:.1f} MiB of weights)")
    return 0


def calibrated_model(args: argparse.Namespace):
    """The model of `args.model` with its weights packed in `args.to` by GPTQ on the calibration records; every
    request is checked before the model is loaded (the loader checks the blocks)."""
    from glm45.config import ModelConfig
    from glm45.evaluation import read_records
    from glm45.quant.calibration import calibrate
    from glm45.quant.scheme import checkpoint_format
    from glm45.tokenizer import Tokenizer

    if args.to not in ("int8", "int4"):
        raise ValueError(f"--calibration chooses int8 or int4 codes; {args.to} rounds to nearest without it")
    if args.calibration_records < 1:
        raise ValueError(f"--calibration-records must be at least 1, got {args.calibration_records}")
    config = ModelConfig.from_pretrained(args.model)
    if checkpoint_format(config) in ("int8", "int4"):
        raise ValueError(f"{args.model} is already quantized ({checkpoint_format(config)}); calibrate from the "
                         "checkpoint it was made from")
    records = read_records(args.calibration, Tokenizer.from_pretrained(args.model),
                           max_len=args.calibration_max_len)[:args.calibration_records]
    if not records:
        raise ValueError(f"{args.calibration} has no records")
    logger.info("GPTQ on %d records (%d tokens), one layer at a time", len(records),
                sum(len(r.input_ids) for r in records))
    return calibrate(args.model, args.to, args.lm_head_quantization, records, args.dtype)


def cmd_export(args: argparse.Namespace) -> int:
    from glm45.export.gguf import export_gguf

    if args.format != "gguf":
        raise ValueError(f"--format must be gguf, got {args.format!r}")
    out = args.out or f"{args.model.rstrip('/')}-{args.outtype}.gguf"
    path = export_gguf(args.model, out, args.outtype)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from glm45.server.app import run_server
    from glm45.server.config import configs_from_args

    engine_config, server_config = configs_from_args(args)
    run_server(engine_config, server_config)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from glm45.cli_args import dataclass_from_args
    from glm45.config import EngineConfig
    from glm45.engine.engine import LLMEngine
    from glm45.terminal_chat import ChatSettings, TerminalChat, load_tools

    if args.model and args.model_positional and args.model != args.model_positional:
        raise ValueError(f"two different models given: {args.model_positional!r} and --model {args.model!r}")
    engine_config = dataclass_from_args(EngineConfig, args, model=args.model or args.model_positional)
    tools = load_tools(args.tools)
    engine = LLMEngine(engine_config)
    settings = dataclass_from_args(ChatSettings, args, color=args.color and sys.stdout.isatty())
    TerminalChat(engine, settings, tools).run()
    return 0


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    from glm45.cli_args import add_dataclass_arguments
    from glm45.config import EngineConfig
    from glm45.terminal_chat import ChatSettings

    parser.add_argument("model_positional", nargs="?", metavar="MODEL",
                        help="a local model folder; default: the bundled small model")
    parser.add_argument("--model", default=None, help="the model folder (same as the positional MODEL)")
    parser.add_argument("--tools", default=None, metavar="FILE", help="a JSON list of OpenAI tool definitions")
    add_dataclass_arguments(parser, ChatSettings)
    add_dataclass_arguments(parser, EngineConfig, skip=("model",))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glm45", description="GLM-4.5 family: run and adapt the models.")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="load a checkpoint and describe it")
    info.add_argument("model", help="a local folder in the Hugging Face layout")
    info.add_argument("--dtype", default="auto")
    info.set_defaults(func=cmd_info)

    from glm45.plan import add_plan_arguments, cmd_plan

    plan = sub.add_parser("plan", help="the memory a model needs and the smallest tensor-parallel size that fits",
                          description="Memory accounting from config.json alone (flags as in vLLM).")
    add_plan_arguments(plan)
    plan.set_defaults(func=cmd_plan)

    quantize = sub.add_parser("quantize", help="save a checkpoint with its weights quantized (fp8, int8, int4)")
    quantize.add_argument("model", help="a local folder in the Hugging Face layout (bf16 or FP8)")
    quantize.add_argument("--to", required=True, choices=["fp8", "int8", "int4"], help="the weight format")
    quantize.add_argument("--lm-head-quantization", choices=["fp8", "int8", "int4", "none"], default=None,
                          help="the LM heads' own format (none: the compute dtype); default: like the weights")
    quantize.add_argument("--out", required=True, help="the folder to write")
    quantize.add_argument("--dtype", default="auto", help="compute dtype of the unquantized parts (norms, biases)")
    quantize.add_argument("--calibration", default=None, metavar="DATA.jsonl",
                          help="choose the int8/int4 codes by GPTQ on these records (texts or conversations, as "
                               "glm45 eval reads them), one layer at a time")
    quantize.add_argument("--calibration-records", type=int, default=256, help="records of --calibration used")
    quantize.add_argument("--calibration-max-len", type=int, default=2048, help="tokens kept of each record")
    quantize.set_defaults(func=cmd_quantize)

    export = sub.add_parser("export", help="write a checkpoint for llama.cpp / Ollama (GGUF)")
    export.add_argument("model", help="a local folder in the Hugging Face layout, with its tokenizer")
    export.add_argument("--format", default="gguf", help="gguf")
    export.add_argument("--outtype", default="bf16", help="f32, f16, bf16 or q8_0 (the weights' type)")
    export.add_argument("--out", default=None, help="the file to write (default: MODEL-OUTTYPE.gguf)")
    export.set_defaults(func=cmd_export)

    from glm45.server.config import add_serve_arguments

    serve = sub.add_parser("serve", help="the OpenAI-compatible server",
                           description="Serve a model over the OpenAI API (flags as in vLLM).")
    add_serve_arguments(serve)
    serve.set_defaults(func=cmd_serve)
    chat = sub.add_parser("chat", help="chat with a model in the terminal")
    add_chat_arguments(chat)
    chat.set_defaults(func=cmd_chat)

    from glm45.evaluation import add_eval_arguments, cmd_eval

    evaluation = sub.add_parser("eval", help="perplexity of held-out texts or conversations, as the engine serves",
                                description="Score held-out JSONL texts or conversations (assistant spans only) "
                                            "with the engine's prompt log-probabilities.")
    add_eval_arguments(evaluation)
    evaluation.set_defaults(func=cmd_eval)

    from glm45.train.cli import add_train_subcommands

    add_train_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    init_logging(args.log_level)
    try:
        return args.func(args)
    except (ValueError, OSError, MemoryError) as e:  # bad input or files: one line, no traceback
        print(f"glm45: error: {e or type(e).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
