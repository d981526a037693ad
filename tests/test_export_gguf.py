"""GGUF export: the file carries llama.cpp's names and settings for GLM-4.5 (`glm4moe`), and llama.cpp
(`llama-cpp-python`, optional) running it gives glm45's greedy tokens on a random-weight checkpoint — f32 and bf16
weights against glm45 on the same weights, q8_0 against glm45 serving the checkpoint in int8 (the same blocks)."""

import pytest
import torch
from train_helpers import make_tokenizer

from glm45.cli import main as cli_main
from glm45.config import ModelConfig
from glm45.model import Glm4MoeForCausalLM

gguf = pytest.importorskip("gguf")

PROMPTS = [[5, 17, 42, 7, 99, 3, 64], [200, 150, 100, 50], [9, 8, 7, 6, 5, 4, 3, 2, 1]]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf_model")
    tokenizer = make_tokenizer(folder)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                         moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, use_qk_norm=True, first_k_dense_replace=1, n_routed_experts=8,
                         num_experts_per_tok=2, routed_scaling_factor=2.5, num_nextn_predict_layers=1,
                         rope_theta=10000.0, max_position_embeddings=512, eos_token_id=tokenizer.eos_token_ids)
    model = Glm4MoeForCausalLM(config)
    model.init_weights(0.15, torch.Generator().manual_seed(3))
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(4))
    model.save_pretrained(folder)
    return folder


@torch.no_grad()
def glm45_tokens(model) -> list[list[int]]:
    """Greedy continuations by whole-sequence forwards: the arithmetic llama.cpp's f32 graph has, without the
    engine's cached decode kernels (whose float rounding can flip a near-tie of a random model)."""
    results = []
    for prompt in PROMPTS:
        ids = list(prompt)
        for _ in range(NEW_TOKENS):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        results.append(ids[len(prompt):])
    return results


def load(folder, **kwargs):
    return Glm4MoeForCausalLM.from_pretrained(folder, dtype=torch.float32, progress=False, **kwargs).eval()


def llama_cpp_tokens(path) -> list[list[int]]:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=1, verbose=False)
    results = []
    for prompt in PROMPTS:
        tokens = []
        for token in llm.generate(prompt, top_k=1, temp=0.0, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            tokens.append(token)
            if len(tokens) == NEW_TOKENS:
                break
        results.append(tokens)
    return results


def test_the_file_has_llama_cpps_names_and_settings_for_glm45(checkpoint, tmp_path):
    out = tmp_path / "model.gguf"
    assert cli_main(["export", str(checkpoint), "--format", "gguf", "--outtype", "q8_0", "--out", str(out)]) == 0
    reader = gguf.GGUFReader(out)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.architecture"] == "glm4moe"
    assert fields["glm4moe.block_count"] == 4 and fields["glm4moe.nextn_predict_layers"] == 1
    assert fields["glm4moe.rope.dimension_count"] == 8 and fields["glm4moe.expert_gating_func"] == 2  # sigmoid
    assert fields["glm4moe.leading_dense_block_count"] == 1 and fields["glm4moe.expert_weights_scale"] == 2.5
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "default"
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["blk.1.ffn_gate_exps.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.1.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["blk.1.exp_probs_b.bias"].tensor_type == gguf.GGMLQuantizationType.F32
    assert {"blk.3.nextn.eh_proj.weight", "blk.3.nextn.shared_head_head.weight", "blk.3.ffn_down_exps.weight",
            "token_embd.weight", "output.weight", "blk.0.attn_q.bias", "blk.0.attn_k_norm.weight"} <= set(tensors)
    with pytest.raises(ValueError, match="outtype"):
        from glm45.export.gguf import export_gguf

        export_gguf(checkpoint, tmp_path / "x.gguf", "q4_k")


@pytest.mark.parametrize("outtype", ["f32", "bf16"])
def test_llama_cpp_gives_glm45s_greedy_tokens(checkpoint, tmp_path, outtype):
    pytest.importorskip("llama_cpp")
    from glm45.export.gguf import export_gguf

    model = load(checkpoint)
    if outtype == "bf16":  # glm45 on the bf16-rounded weights, computing in float32 as llama.cpp does
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.dim() >= 2 and not name.endswith("mlp.gate.weight"):
                    param.copy_(param.to(torch.bfloat16).float())
    path = export_gguf(checkpoint, tmp_path / f"model-{outtype}.gguf", outtype)
    assert llama_cpp_tokens(path) == glm45_tokens(model)


def test_q8_0_holds_glm45s_int8_blocks_and_runs_like_glm45_int8(checkpoint, tmp_path):
    """The Q8_0 tensors dequantize to exactly glm45's int8 weights. llama.cpp also rounds activations to 8 bits
    in its Q8_0 products (glm45's int8 path does only for 1–4 rows), so its logits are compared, not its tokens: as
    close to glm45-int8's as the activations' rounding allows — closer than they are to float32's."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np

    from glm45.export.gguf import export_gguf
    from glm45.quant.packed import quantize_int8

    path = export_gguf(checkpoint, tmp_path / "model-q8_0.gguf", "q8_0")
    full = load(checkpoint)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    gate_up = full.model.layers[1].mlp.experts.gate_up_proj.detach()
    for name, weight in (("blk.1.ffn_up_exps.weight", gate_up[:, 32:]), ("blk.0.attn_q.weight",
                                                                         full.model.layers[0].self_attn.q_proj.weight)):
        stored = gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type).reshape(weight.shape)
        assert np.array_equal(stored, quantize_int8(weight.detach()).dequantize().numpy()), name

    int8 = load(checkpoint, quantization="int8")
    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=1, verbose=False, logits_all=True)
    to_int8, to_float = [], []
    for prompt, generated in zip(PROMPTS, glm45_tokens(int8), strict=True):
        sequence = prompt + generated
        llm.reset()
        llm.eval(sequence)
        theirs = np.array(llm.scores[:len(sequence)])
        with torch.no_grad():
            ours, exact = (m(torch.tensor([sequence]))[0].numpy() for m in (int8, full))
        assert theirs[len(prompt) - 1].argmax() == generated[0]
        to_int8 += list(np.abs(theirs - ours).max(-1))
        to_float += list(np.abs(theirs - exact).max(-1))
    assert np.median(to_int8) < np.median(to_float), (np.median(to_int8), np.median(to_float))
