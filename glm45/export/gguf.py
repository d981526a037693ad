"""GGUF export, so that a glm45 checkpoint (a fine-tune included) runs in llama.cpp and Ollama:
`glm45 export MODEL --format gguf --outtype bf16|q8_0|f16|f32 --out model.gguf` (needs the `gguf` package).

The file is what llama.cpp's own converter (`convert_hf_to_gguf.py`, class `Glm4MoeModel`) writes for GLM-4.5:
architecture `glm4moe`; tensor names from gguf-py's map for that architecture (the routed experts stacked per layer as
`ffn_{gate,up,down}_exps`, the balancing bias as `exp_probs_b.bias`, the MTP layer as block N with its `nextn.*`
tensors and `nextn_predict_layers` set); the hyper-parameters it sets (partial RoPE as `rope.dimension_count`,
sigmoid gating, `expert_weights_scale`/`_norm`, leading dense blocks, shared-expert count); and the GLM tokenizer as
it stores it: `gpt2` BPE with merges, added tokens CONTROL when special, `[gMASK]` as BOS, `<|user|>` as EOT,
`<|observation|>` as EOM, `<|endoftext|>` as UNK, and the chat template.

Types follow the converter's rules: 1-D tensors, norms, routers and biases in F32; every other weight in the
`--outtype`. Q8_0 blocks are glm45's own int8 blocks (`glm45.quant.packed.quantize_int8`: 32 weights, an fp16 scale,
the same layout), so llama.cpp computes with exactly the weights `--quantization int8` serves (embedding tables stay
BF16 or F32, as int8 serving keeps them); a row whose width is not a multiple of 32 falls back to F16, as in the
converter.

The pre-tokenizer name is llama.cpp's: `glm4` when this tokenizer splits text as GLM-4's does (recognised by the
converter's own check: the hash of the ids of a fixed text), else `default` with a warning — token-id prompts are
unaffected, text prompts are pre-tokenised differently by llama.cpp then (the bundled small model's tokenizer splits
digits and spaces its own way).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from glm45.model.state_dict import checkpoint_name

logger = logging.getLogger(__name__)

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# llama.cpp's check text and the hashes of its ids under GLM-4-family tokenizers (convert_hf_to_gguf.py).
CHECK_TEXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ '
              '(multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 '
              'កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български '
              '\'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure '
              'I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
GLM4_HASHES = {"a1336059768a55c99a734006ffb02203cd450fed003e9a71886c88acf24fdbc2",
               "9ca2dd618e8afaf09731a7cf6e2105b373ba6a1821559f258b272fe83e6eb902",
               "cdf5f35325780597efd76153d4d1c16778f766173908894c04afc20108536267"}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ValueError("GGUF export needs the gguf package: pip install gguf") from None
    return gguf


def hf_tensors(model) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's tensors under the names llama.cpp's converter sees after its own stacking: checkpoint names, the
    MTP layer as the layer after the last, experts as `…mlp.experts.{gate,up,down}_proj.weight` [E, out, in]."""
    config = model.config
    for internal, tensor in model.state_dict().items():
        name = checkpoint_name(internal, config)
        if name.endswith("mlp.experts.gate_up_proj"):
            gate, up = tensor.chunk(2, dim=1)
            yield name[:-len("gate_up_proj")] + "gate_proj.weight", gate
            yield name[:-len("gate_up_proj")] + "up_proj.weight", up
        elif name.endswith("mlp.experts.down_proj"):
            yield name + ".weight", tensor
        elif name.endswith("e_score_correction_bias"):
            yield name.replace("e_score_correction_bias", "e_score_correction.bias"), tensor
        else:
            yield name, tensor


def _q8_0_bytes(tensor: torch.Tensor) -> np.ndarray:
    """glm45's int8 blocks as Q8_0's bytes: per 32 weights, the fp16 scale then the 32 int8 codes."""
    from glm45.quant.packed import quantize_int8

    packed = quantize_int8(tensor.float())
    *lead, rows, width = packed.data.shape
    scale = packed.scale.contiguous().view(torch.uint8).reshape(*lead, rows, width // 32, 2)
    codes = packed.data.contiguous().view(torch.uint8).reshape(*lead, rows, width // 32, 32)
    return torch.cat([scale, codes], dim=-1).reshape(*lead, rows, width // 32 * 34).numpy()


def _encode(gguf, name: str, gguf_name: str, tensor: torch.Tensor, outtype: str):
    """(numpy data, raw GGML type) of one tensor, by the converter's type rules."""
    q = gguf.GGMLQuantizationType
    data = tensor.detach().float().cpu()
    keep_f32 = data.dim() <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight") \
        or ".ffn_gate_inp." in gguf_name
    if keep_f32 or outtype == "f32":
        return data.numpy(), q.F32
    if outtype == "q8_0" and name.endswith("embed_tokens.weight"):  # int8 serving keeps embeddings as they are
        if tensor.dtype == torch.bfloat16:
            return gguf.quants.quantize(data.numpy(), q.BF16), q.BF16
        return data.numpy(), q.F32
    if outtype == "q8_0" and data.shape[-1] % 32 == 0:
        return _q8_0_bytes(data), q.Q8_0
    if outtype == "bf16":
        return gguf.quants.quantize(data.numpy(), q.BF16), q.BF16
    return data.numpy().astype(np.float16), q.F16


def _add_parameters(writer, gguf, config, outtype: str, name: str) -> None:
    n_mtp = config.num_nextn_predict_layers
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers + n_mtp)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_expert_count(config.n_routed_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_expert_group_count(config.n_group)
    writer.add_expert_group_used_count(config.topk_group)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_types[outtype])
    writer.add_rope_dimension_count(config.rotary_dim)
    writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    writer.add_expert_shared_count(config.n_shared_experts)
    writer.add_leading_dense_block_count(config.first_k_dense_replace)
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    writer.add_expert_weights_scale(config.routed_scaling_factor)
    writer.add_expert_weights_norm(config.norm_topk_prob)
    if n_mtp:
        writer.add_nextn_predict_layers(n_mtp)


def pre_tokenizer(tokenizer) -> str:
    # As transformers' `encode` does (the converter's call): the tokenizer's post-processor included.
    digest = hashlib.sha256(str(tokenizer._tok.encode(CHECK_TEXT).ids).encode()).hexdigest()
    if digest in GLM4_HASHES:
        return "glm4"
    logger.warning("this tokenizer does not split text as GLM-4's does: the GGUF names the `default` pre-tokenizer, "
                   "so llama.cpp tokenises text prompts differently (token-id prompts are unaffected)")
    return "default"


def _add_tokenizer(writer, gguf, model_dir: Path, vocab_size: int) -> None:
    from glm45.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(model_dir)
    by_id = {i: text for text, i in tokenizer._tok.get_vocab(with_added_tokens=True).items()}
    added = {int(i): t for i, t in tokenizer._tok.get_added_tokens_decoder().items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if tokenizer.is_special(i) else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True)
    for kind, text in (("bos", "[gMASK]"), ("eot", "<|user|>"), ("unk", "<|endoftext|>"), ("eom", "<|observation|>")):
        token_id = tokenizer.token_to_id(text)
        if token_id is not None:
            special._set_special_token(kind, token_id)
    if special.chat_template is None and (model_dir / "chat_template.jinja").is_file():
        special.chat_template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    special.add_to_gguf(writer)


def export_gguf(model_dir: str | Path, out: str | Path, outtype: str = "bf16") -> Path:
    """Write `model_dir` (an HF-layout glm45 checkpoint with its tokenizer) as one GGUF file."""
    gguf = _gguf()
    from glm45.model import Glm4MoeForCausalLM

    if outtype not in OUTTYPES:
        raise ValueError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    model_dir, out = Path(model_dir), Path(out)
    if not (model_dir / "tokenizer.json").is_file():
        raise ValueError(f"{model_dir} has no tokenizer.json; llama.cpp needs the vocabulary in the GGUF file")
    model = Glm4MoeForCausalLM.from_pretrained(model_dir, dtype=torch.float32, quantization="none", progress=False)
    config = model.config
    block_count = config.num_hidden_layers + (config.num_nextn_predict_layers if model.mtp is not None else 0)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GLM4_MOE, block_count)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(out, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GLM4_MOE])
    if model.mtp is None:
        config.num_nextn_predict_layers = 0
    _add_parameters(writer, gguf, config, outtype, model_dir.name)
    _add_tokenizer(writer, gguf, model_dir, config.vocab_size)
    for name, tensor in hf_tensors(model):
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"no GGUF name for the tensor {name}")
        data, kind = _encode(gguf, name, gguf_name, tensor, outtype)
        writer.add_tensor(gguf_name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return out
