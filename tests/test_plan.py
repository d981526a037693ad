"""`glm45 plan`: the byte rules, the accounting against real tensors and files, the official hardware table
of GLM-4.5 (reproduced or explained, row by row) and the command line."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_checkpoints import TINY_CONFIGS

import glm45.plan
from glm45.cli import main
from glm45.config import ModelConfig
from glm45.distributed import ParallelGroup
from glm45.model import Glm4MoeForCausalLM
from glm45.model.state_dict import checkpoint_name, checkpoint_tensors
from glm45.parallel.tensor_parallel import parallelize_model
from glm45.plan import (
    GPUS,
    LABELS,
    WEIGHT_FORMATS,
    WeightBytes,
    block_problems,
    checkpoint_format,
    describe,
    kv_bytes_per_token,
    part_of,
    plan_memory,
    plan_model,
    weight_bytes,
)

GiB = 1 << 30


def tiny_config(kind: str, **changes) -> ModelConfig:
    return ModelConfig.from_dict({**TINY_CONFIGS[kind], "model_type": "glm4_moe", "num_nextn_predict_layers": 1,
                                  **changes})


# ---------------------------------------------------------------------------------------------- byte rules
def test_format_table_bytes():
    rows, cols = 256, 1024
    n = rows * cols
    assert WEIGHT_FORMATS["bf16"].nbytes(rows, cols) == 2 * n
    assert WEIGHT_FORMATS["fp8"].nbytes(rows, cols) == n + 4 * rows                  # fp32 scale per output row
    assert WEIGHT_FORMATS["fp8_block"].nbytes(rows, cols) == n + 4 * (2 * 8)         # 128×128 blocks
    assert WEIGHT_FORMATS["fp8_block"].nbytes(130, 130) == 130 * 130 + 4 * (2 * 2)   # partial blocks count
    assert WEIGHT_FORMATS["int8"].nbytes(rows, cols) == n // 32 * 34                 # Q8_0: 34 bytes / 32
    assert WEIGHT_FORMATS["int4"].nbytes(rows, cols) == n // 256 * 148               # like Q4_K: 148 bytes / 256
    assert WEIGHT_FORMATS["int4"].nbytes(2, 352) == 2 * (176 + 11 * 2 + 2 * 4)       # 11 blocks: super-blocks 8 + 3


def test_the_int4_table_entry_is_what_packing_holds():
    from glm45.quant.packed import quantize

    for cols in (256, 352, 1024):
        assert WEIGHT_FORMATS["int4"].nbytes(48, cols) == quantize(torch.randn(48, cols), "int4").nbytes


def test_block_formats_name_the_tensor_whose_input_they_do_not_divide():
    config = tiny_config("air_like", moe_intermediate_size=48)  # 48 = 1.5 blocks of 32
    assert block_problems(config, WEIGHT_FORMATS["int8"], 1) == [
        f"{name}: 48 input columns are not a whole number of int8 blocks of 32"
        for name in ("model.layers.*.mlp.experts.down_proj", "model.layers.*.mlp.shared_experts.down_proj",
                     "model.layers.3.mlp.experts.down_proj", "model.layers.3.mlp.shared_experts.down_proj")]
    assert block_problems(config, WEIGHT_FORMATS["fp8"], 1) == []
    with pytest.raises(ValueError, match=r"int4 cannot store this model: model.layers.\*.mlp.experts.down_proj: 48 "):
        plan_memory(config, quantization="int4")
    # Row-parallel layers split their input, which can break blocks the whole tensor respects: GLM-4.5's
    # experts (moe_intermediate_size 1536) keep 48 columns at TP 32, Air's dense MLP (10944) 2736 at TP 4.
    assert plan_model("GLM-4.5", quantization="int4").tp_sizes == (1, 2, 4, 8, 16)
    assert plan_model("GLM-4.5").tp_sizes == (1, 2, 4, 8, 16, 32)
    assert plan_model("GLM-4.5-Air", quantization="int8").tp_sizes == (1, 2)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=4 does not evenly split model.layers.\*.mlp.down_proj"):
        plan_model("GLM-4.5-Air", quantization="int8", tensor_parallel_size=4)


def test_kv_bytes_per_token():
    glm = plan_model("GLM-4.5").config
    assert kv_bytes_per_token(glm, 2) == 2 * 92 * 8 * 128 * 2 == 376_832
    assert kv_bytes_per_token(glm, 1) == 188_416                         # fp8 halves it
    assert kv_bytes_per_token(glm, 1, mtp=True) == 188_416 + 2 * 8 * 128  # the MTP layer's own cache
    assert kv_bytes_per_token(glm, 1, tp=4) == 188_416 // 4
    # 8 KV heads: from 8 ranks on, every rank keeps one KV head, so the per-rank cache stops shrinking.
    assert kv_bytes_per_token(glm, 1, tp=8) == kv_bytes_per_token(glm, 1, tp=32) == 188_416 // 8


# ---------------------------------------------------------------------------------------------- against tensors
def _bytes_by_part(state: dict[str, torch.Tensor], config: ModelConfig, names=lambda n: n) -> WeightBytes:
    parts = dict.fromkeys(LABELS, 0)
    for name, tensor in state.items():
        parts[part_of(names(name), config)] += tensor.numel() * tensor.element_size()
    return WeightBytes(**parts)


@pytest.mark.parametrize("kind", [*TINY_CONFIGS, "padded_vocab"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_weight_bytes_equal_the_models_tensors_on_each_rank(kind, tp):
    """fp32 stores every tensor in 4 bytes, so the plan must count exactly the parameters and buffers that
    glm45's model holds on one rank after tensor parallelism (KV heads replicated at tp=4, vocabulary padded)."""
    config = tiny_config("air_like", vocab_size=321) if kind == "padded_vocab" else tiny_config(kind)
    with torch.device("meta"):
        model = Glm4MoeForCausalLM(config, with_mtp=True)
        parallelize_model(model, ParallelGroup(None, tp - 1, tp))
    held = _bytes_by_part(model.state_dict(), config, lambda n: checkpoint_name(n, config))
    assert weight_bytes(config, WEIGHT_FORMATS["fp32"], tp) == held


def test_bundled_checkpoint_stored_bytes_equal_the_computed_ones():
    from glm45.engine.engine import bundled_model_path

    plan = plan_model(str(bundled_model_path()), num_speculative_tokens=1)
    assert plan.quantization == "fp32" and plan.stored is not None
    assert plan.stored == weight_bytes(plan.config, WEIGHT_FORMATS["fp32"]) == plan.weights
    assert "and its safetensors headers" in plan.source


def _fp8_checkpoint(folder, config: ModelConfig) -> None:
    """A checkpoint laid out as the GLM-4.5-FP8 releases: linear layers e4m3 with an fp32 scale per output
    channel; embeddings, heads, eh_proj, norms and biases bf16; routers and their bias fp32."""
    torch.manual_seed(0)
    model = Glm4MoeForCausalLM(config, with_mtp=True)
    tensors = {}
    for name, tensor in checkpoint_tensors(model):
        if ".mlp.gate." in name:
            tensors[name] = tensor.float().contiguous()
        elif name.endswith("_proj.weight") and "eh_proj" not in name:
            scale = tensor.abs().amax(dim=1, keepdim=True).float() / 448
            tensors[name] = (tensor / scale).to(torch.float8_e4m3fn)
            tensors[name.removesuffix("weight") + "weight_scale"] = scale
        else:
            tensors[name] = tensor.to(torch.bfloat16).contiguous()
    save_file(tensors, str(folder / "model.safetensors"))
    raw = {**TINY_CONFIGS["glm45_like"], "model_type": "glm4_moe", "num_nextn_predict_layers": 1,
           "quantization_config": plan_model("GLM-4.5-FP8").config.quantization_config}
    (folder / "config.json").write_text(json.dumps(raw))


def test_fp8_checkpoint_is_detected_and_its_files_match_the_fp8_rule(tmp_path):
    config = tiny_config("glm45_like")
    _fp8_checkpoint(tmp_path, config)
    plan = plan_model(str(tmp_path), num_speculative_tokens=1)
    assert plan.quantization == "fp8"
    assert plan.stored == weight_bytes(config, WEIGHT_FORMATS["fp8"]) == plan.weights
    # Re-quantized at load: the plan counts the new format and still shows what the files hold.
    int8 = plan_model(str(tmp_path), quantization="int8")
    assert int8.weights == weight_bytes(config, WEIGHT_FORMATS["int8"]) and int8.stored == plan.stored


@pytest.mark.parametrize("fmt, head", [("int8", None), ("int4", None), ("int4", "int8"), ("int8", "none")])
def test_quantized_checkpoint_files_match_the_plans_rule(tmp_path, fmt, head):
    """`glm45 quantize` of a bf16 checkpoint packs the LM heads and eh_proj too, the LM heads in their own format
    when one is given: the plan counts them so, from the checkpoint's record and from the flag alike."""
    config = tiny_config("glm45_like")
    torch.manual_seed(0)
    model = Glm4MoeForCausalLM(config, with_mtp=True)
    tensors = {name: tensor.float().contiguous() if ".mlp.gate." in name else tensor.to(torch.bfloat16).contiguous()
               for name, tensor in checkpoint_tensors(model)}
    (tmp_path / "bf16").mkdir()
    save_file(tensors, str(tmp_path / "bf16" / "model.safetensors"))
    (tmp_path / "bf16" / "config.json").write_text(json.dumps(
        {**TINY_CONFIGS["glm45_like"], "model_type": "glm4_moe", "num_nextn_predict_layers": 1}))
    heads = ["--lm-head-quantization", head] if head else []
    assert main(["quantize", str(tmp_path / "bf16"), "--to", fmt, *heads, "--out", str(tmp_path / fmt),
                 "--dtype", "bfloat16"]) == 0
    plan = plan_model(str(tmp_path / fmt), num_speculative_tokens=1)
    head_format = {None: None, "none": "bf16"}.get(head, head)
    assert plan.quantization == fmt and plan.lm_head_quantization == head_format
    expected = weight_bytes(config, WEIGHT_FORMATS[fmt], head=WEIGHT_FORMATS[head_format] if head_format else None)
    assert plan.stored == expected == plan.weights
    at_load = plan_model(str(tmp_path / "bf16"), quantization=fmt, lm_head_quantization=head,
                         num_speculative_tokens=1)
    assert at_load.weights == expected
    if head:
        assert f"the LM heads in {head_format}" in describe(plan)
        assert expected.embeddings != weight_bytes(config, WEIGHT_FORMATS[fmt]).embeddings


def test_index_without_shards_gives_the_stored_total(tmp_path):
    config = tiny_config("air_like", num_nextn_predict_layers=0)
    raw = {**TINY_CONFIGS["air_like"], "model_type": "glm4_moe", "num_nextn_predict_layers": 0}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    computed = weight_bytes(config, WEIGHT_FORMATS["bf16"])
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
             "model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.experts.0.up_proj.weight",
             "model.layers.1.mlp.shared_experts.up_proj.weight"]
    index = {"metadata": {"total_size": 2 * computed.total}, "weight_map": dict.fromkeys(names, "x.safetensors")}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    plan = plan_model(str(tmp_path))
    assert plan.stored.total == pytest.approx(2 * computed.total, abs=8) and plan.stored.mtp == 0
    assert "safetensors index" in plan.source
    with pytest.raises(ValueError, match="needs the model's MTP layer"):
        plan_model(str(tmp_path), num_speculative_tokens=1)


def test_checkpoint_formats_from_quantization_config():
    def fmt(qc):
        return checkpoint_format(tiny_config("air_like", quantization_config=qc))

    assert fmt(None) == "bf16"  # no torch_dtype: bfloat16, as released
    assert fmt({"quant_method": "fp8", "weight_block_size": [128, 128]}) == "fp8_block"
    assert fmt(plan_model("GLM-4.5-Air-FP8").config.quantization_config) == "fp8"
    assert fmt({"quant_method": "int4"}) == "int4"
    block = {"quant_method": "compressed-tensors",
             "config_groups": {"g": {"weights": {"num_bits": 8, "type": "float", "strategy": "block"}}}}
    assert fmt(block) == "fp8_block"
    with pytest.raises(ValueError, match="not a format glm45 reads"):
        fmt({"quant_method": "awq", "bits": 4})
    int4 = tiny_config("air_like", quantization_config={"quant_method": "int4"})
    with pytest.raises(ValueError, match="--quantization int8 contradicts the checkpoint, which is stored in int4"):
        plan_memory(int4, quantization="int8")
    fp8_block = tiny_config("air_like", quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    assert plan_memory(fp8_block, quantization="fp8").quantization == "fp8_block"  # keeps the stored layout


# ---------------------------------------------------------------------------------------------- the official table
# GLM-4.5's README (zai-org/GLM-4.5, "System Requirements", as released in July 2025): the GPUs the models
# need with MTP on (--speculative-num-steps 3), batch ≤ 8, "both weights and cache in FP8" (for the BF16
# rows: BF16 weights, FP8 cache), first to run and then to use the full 128K context.
#   (table, model, precision, GPU, official count, ours, why they differ)
KV8 = ("GLM-4.5 has 8 KV heads, so from TP 8 on every GPU keeps one and the same 23.3 GiB of FP8 cache for "
       "8 × 128K tokens: more GPUs shrink only the weights. Here TP {ours} fits with {slack:.1f} GiB to spare "
       "per GPU; setting aside 3% more of each GPU (--gpu-memory-utilization 0.87) gives the official count.")
OFFICIAL = [
    ("minimum", "GLM-4.5", "BF16", "H100", 16, 16, None),
    ("minimum", "GLM-4.5", "BF16", "H200", 8, 8, None),
    ("minimum", "GLM-4.5", "FP8", "H100", 8, 8, None),
    ("minimum", "GLM-4.5", "FP8", "H200", 4, 4, None),
    ("minimum", "GLM-4.5-Air", "BF16", "H100", 4, 4, None),
    ("minimum", "GLM-4.5-Air", "BF16", "H200", 2, 2, None),
    ("minimum", "GLM-4.5-Air", "FP8", "H100", 2, 2, None),
    ("minimum", "GLM-4.5-Air", "FP8", "H200", 1, 1, None),
    ("128k", "GLM-4.5", "BF16", "H100", 32, 16, KV8),
    ("128k", "GLM-4.5", "BF16", "H200", 16, 8,
     "Twice the minimum, but 8 × 128K tokens of FP8 cache add only 23.3 GiB per GPU at TP 8, which 8 H200s "
     "hold with {slack:.1f} GiB to spare; with a BF16 cache (--kv-cache-dtype auto) it takes 16, as listed."),
    ("128k", "GLM-4.5", "FP8", "H100", 16, 8, KV8),
    ("128k", "GLM-4.5", "FP8", "H200", 8, 8, None),
    ("128k", "GLM-4.5-Air", "BF16", "H100", 8, 8, None),
    ("128k", "GLM-4.5-Air", "BF16", "H200", 4, 4, None),
    ("128k", "GLM-4.5-Air", "FP8", "H100", 4, 4, None),
    ("128k", "GLM-4.5-Air", "FP8", "H200", 2, 2, None),
]
# "minimum": 8 sequences of 16K tokens (as much cache as one 128K sequence); "128k": 8 sequences of 128K.
SCENARIOS = {"minimum": 16384, "128k": 131072}


def official_plan(table: str, model: str, precision: str, gpu: str, **changes):
    settings = dict(quantization=precision.lower(), kv_cache_dtype="fp8", max_model_len=SCENARIOS[table],
                    max_num_seqs=8, num_speculative_tokens=3, gpus=[GPUS[gpu]])
    return plan_model(model, **{**settings, **changes}).fit(gpu)


@pytest.mark.parametrize("table, model, precision, gpu, official, ours, why", OFFICIAL,
                         ids=[f"{t}-{m}-{p}-{g}" for t, m, p, g, *_ in OFFICIAL])
def test_official_hardware_table(table, model, precision, gpu, official, ours, why):
    fit = official_plan(table, model, precision, gpu)
    assert fit.tensor_parallel_size == ours
    if why is None:
        assert ours == official
        return
    slack = (fit.budget - fit.used) / GiB
    print(why.format(ours=ours, slack=slack))
    assert f"{slack:.1f} GiB" in why.format(ours=ours, slack=slack) and f"{slack:.1f}" in glm45.plan.__doc__
    assert f"{fit.kv_cache / GiB:.1f} GiB" == "23.3 GiB"
    if why is KV8:
        assert fit.kv_cache == official_plan(table, model, precision, gpu, tensor_parallel_size=32).kv_cache
        assert slack < 2.0
        assert official_plan(table, model, precision, gpu, gpu_memory_utilization=0.87).tensor_parallel_size \
            == official
    else:
        assert official_plan(table, model, precision, gpu, kv_cache_dtype="auto").tensor_parallel_size == official


# ---------------------------------------------------------------------------------------------- command line
def test_cli_prints_the_plan(capsys):
    args = ["plan", "GLM-4.5-Air", "--quantization", "fp8", "--kv-cache-dtype", "fp8", "--max-model-len", "131072",
            "--max-num-seqs", "8", "--speculative-num-steps", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "weights: fp8 (e4m3, one fp32 scale per output channel" in out
    assert "96,256 bytes per token (2 × 46 layers × 8 KV heads × 128 × 1 B + 2,048 for the MTP layer)" in out
    assert "H100 (79.1 GiB): TP 4" in out and "H200 (139.8 GiB): TP 2" in out
    assert main(["plan", "GLM-4.5", "--gpu", "h200", "--tensor-parallel-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "H200 (139.8 GiB): does not fit even at TP 4" in out and "H100" not in out
    assert main(["plan", "GLM-4.5-FP8", "--gpu-memory", "96"]) == 0
    assert "GPU (96.0 GiB): TP 8" in capsys.readouterr().out


def test_readme_example_is_the_real_output(capsys):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("```console\n$ glm45 plan ", 1)[1].split("```", 1)[0]
    command, expected = block.split("\n", 1)
    assert main(["plan", *command.split()]) == 0
    assert capsys.readouterr().out == expected


def test_describe_is_what_the_cli_prints(capsys):
    main(["plan", "GLM-4.5"])
    assert capsys.readouterr().out.strip() == describe(plan_model("GLM-4.5"))


@pytest.mark.parametrize("args, message", [
    (["GLM-4.5", "--quantization", "int3"], "unknown quantization 'int3'; supported: auto, bf16, fp8, int8, int4"),
    (["GLM-4.5", "--kv-cache-dtype", "fp4"], "unknown kv_cache_dtype 'fp4'; supported: auto, fp8"),
    (["GLM-4.6"], "'GLM-4.6' is not a folder with a config.json, a config.json file, or one of the known models"),
    (["GLM-4.5", "--gpu", "A100"], "unknown GPU 'A100'; known: H100, H200"),
    (["GLM-4.5", "--max-model-len", "200000"], "max_model_len=200000 exceeds the model's context length (131072"),
    (["GLM-4.5", "--tensor-parallel-size", "64"], "tensor_parallel_size=64 does not evenly split num_attention_heads"),
    (["GLM-4.5", "--tensor-parallel-size", "0"], "tensor_parallel_size must be ≥ 1, got 0"),
    (["GLM-4.5", "--max-num-seqs", "0"], "max_num_seqs must be ≥ 1, got 0"),
    (["GLM-4.5", "--gpu-memory-utilization", "1.5"], "gpu_memory_utilization must be in (0, 1], got 1.5"),
])
def test_cli_bad_input_is_one_line_and_exit_code_2(capsys, args, message):
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"glm45: error: {message}") and err.count("\n") == 1
