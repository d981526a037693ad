"""Checkpoint loading and saving: layouts, MTP, FP8, sharding, and clear errors on damaged checkpoints."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_checkpoints import AIR_LIKE, build_reference, save_reference

from glm45.config import ModelConfig
from glm45.model import Glm4MoeForCausalLM
from glm45.model.checkpoint import Checkpoint, CheckpointError, dequantize_fp8
from glm45.quant.calibration import calibrate
from glm45.quant.packed import PackedWeight

IDS = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def air_folder(tmp_path_factory):
    return save_reference("air_like", tmp_path_factory.mktemp("air"))


def our_model_with_mtp() -> Glm4MoeForCausalLM:
    hf = {k: v for k, v in AIR_LIKE.items() if k != "rope_parameters"}
    config = ModelConfig.from_dict({**hf, "model_type": "glm4_moe", "rope_theta": 10000.0,
                                    "partial_rotary_factor": 0.5, "num_nextn_predict_layers": 1})
    torch.manual_seed(0)
    model = Glm4MoeForCausalLM(config)
    model.init_weights(std=0.08)
    return model.eval()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids)


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def rewrite_tensors(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_save_load_round_trip_keeps_mtp(tmp_path):
    model = our_model_with_mtp()
    model.save_pretrained(tmp_path)
    names = load_file(tmp_path / "model.safetensors").keys()
    n = model.config.num_hidden_layers
    assert f"model.layers.{n}.eh_proj.weight" in names
    assert f"model.layers.{n}.shared_head.head.weight" in names
    assert f"model.layers.{n}.mlp.experts.15.down_proj.weight" in names
    loaded = Glm4MoeForCausalLM.from_pretrained(tmp_path, dtype="float32", progress=False)
    assert loaded.mtp is not None
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    without = Glm4MoeForCausalLM.from_pretrained(tmp_path, dtype="float32", load_mtp=False, progress=False)
    assert without.mtp is None
    assert torch.equal(logits(without), logits(model))


def mtp_draft_logits(model, ids=IDS):
    """The MTP layer's logits for (h_t, x_{t+1}) pairs of `ids` (no cache: the whole sequence at once)."""
    with torch.no_grad():
        positions = torch.arange(ids.shape[1] - 1).expand(ids.shape[0], -1)
        hidden = model.hidden_states(ids[:, :-1], positions)
        return model.mtp_draft(ids[:, 1:], hidden, positions)[1]


def model_with_mtp_copies(folder):
    """A model whose MTP layer stores exact copies of the main embedding and head (GLM-4.5's layout)."""
    model = our_model_with_mtp()
    with torch.no_grad():
        model.mtp.embed_tokens.weight.copy_(model.model.embed_tokens.weight)
        model.mtp.shared_head.head.weight.copy_(model.lm_head.weight)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_mtp_copies_of_the_embedding_and_head_are_shared_or_taken_from_the_main_model(tmp_path, quantization):
    """GLM-4.5 stores copies of the embedding and head in its MTP layer, GLM-4.6 leaves them out: both load, to the
    same draft logits, and the engine's loads keep one tensor for both places."""
    n = our_model_with_mtp().config.num_hidden_layers
    glm45_layout = tmp_path / "copies"
    reference = model_with_mtp_copies(glm45_layout)
    glm46_layout = copy_checkpoint(glm45_layout, tmp_path / "left_out")
    rewrite_tensors(glm46_layout, lambda t: [t.pop(f"model.layers.{n}.{name}.weight")
                                             for name in ("embed_tokens", "shared_head.head")])
    load = dict(dtype="float32", progress=False, quantization=quantization)
    apart = Glm4MoeForCausalLM.from_pretrained(glm45_layout, **load)
    expected = mtp_draft_logits(apart)
    if quantization is None:
        assert torch.equal(expected, mtp_draft_logits(reference))
    assert apart.mtp.shared_head.head is not apart.lm_head
    assert apart.mtp.embed_tokens.weight.data_ptr() != apart.model.embed_tokens.weight.data_ptr()
    for folder in (glm45_layout, glm46_layout):
        for share in (False, True):
            model = Glm4MoeForCausalLM.from_pretrained(folder, share_mtp_copies=share, **load)
            assert torch.equal(mtp_draft_logits(model), expected), (folder.name, share)
            assert torch.equal(logits(model), logits(apart))
            shared = model.mtp.shared_head.head is model.lm_head and model.mtp.embed_tokens is model.model.embed_tokens
            # Training (no sharing) keeps a trainable copy even of what the checkpoint left out; packed weights
            # are not trained, so a left-out packed head is the main one either way.
            if share:
                assert shared
            elif quantization is None:
                assert model.mtp.embed_tokens.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
                assert model.mtp.shared_head.head.weight.data_ptr() != model.lm_head.weight.data_ptr()
            saved = tmp_path / f"saved-{folder.name}-{share}"
            if quantization is None:
                model.save_pretrained(saved)  # back in GLM-4.5's layout, the copies stored
                again = load_file(saved / "model.safetensors")
                assert torch.equal(again[f"model.layers.{n}.shared_head.head.weight"], again["lm_head.weight"])


def test_an_mtp_head_that_differs_from_the_main_one_is_not_shared(tmp_path):
    model = our_model_with_mtp()  # independent random embedding and head in its MTP layer
    model.save_pretrained(tmp_path)
    loaded = Glm4MoeForCausalLM.from_pretrained(tmp_path, dtype="float32", progress=False, share_mtp_copies=True)
    assert loaded.mtp.shared_head.head is not loaded.lm_head
    assert loaded.mtp.embed_tokens is not loaded.model.embed_tokens
    assert torch.equal(mtp_draft_logits(loaded), mtp_draft_logits(model))


def test_transformers_loads_what_we_save(tmp_path):
    from transformers import Glm4MoeForCausalLM as Reference

    model = our_model_with_mtp()
    model.save_pretrained(tmp_path)
    reference = Reference.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(IDS).logits
    assert torch.allclose(logits(model), expected, atol=1e-4 * expected.abs().max())


def test_sharded_checkpoint_with_index(tmp_path, air_folder):
    model = Glm4MoeForCausalLM.from_pretrained(air_folder, dtype="float32", progress=False)
    model.save_pretrained(tmp_path, max_shard_bytes=100_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (tmp_path / "model.safetensors").exists()
    reloaded = Glm4MoeForCausalLM.from_pretrained(tmp_path, dtype="float32", progress=False)
    assert torch.equal(logits(reloaded), logits(model))


def test_fused_expert_tensors_load(tmp_path, air_folder):
    folder = copy_checkpoint(air_folder, tmp_path / "fused")

    def fuse(tensors):
        for layer in range(1, 3):
            prefix = f"model.layers.{layer}.mlp.experts"
            gate_up, down = [], []
            for e in range(16):
                gate_up.append(torch.cat([tensors.pop(f"{prefix}.{e}.gate_proj.weight"),
                                          tensors.pop(f"{prefix}.{e}.up_proj.weight")]))
                down.append(tensors.pop(f"{prefix}.{e}.down_proj.weight"))
            tensors[f"{prefix}.gate_up_proj"] = torch.stack(gate_up)
            tensors[f"{prefix}.down_proj"] = torch.stack(down)

    rewrite_tensors(folder, fuse)
    fused = Glm4MoeForCausalLM.from_pretrained(folder, dtype="float32", progress=False)
    plain = Glm4MoeForCausalLM.from_pretrained(air_folder, dtype="float32", progress=False)
    assert torch.equal(logits(fused), logits(plain))


def test_matching_dtype_is_zero_copy(air_folder):
    checkpoint = Checkpoint(air_folder)
    first = checkpoint.raw("model.embed_tokens.weight")
    again, _ = checkpoint.weight("model.embed_tokens.weight", torch.float32)
    assert first.data_ptr() == again.data_ptr()  # both views of the memory map, no copy made


def test_loading_does_not_import_the_compiler(air_folder):
    """A meta-device model draws no initial values: `normal_` on meta would import torch._dynamo and triton."""
    script = (f"import sys; from glm45.model import Glm4MoeForCausalLM; "
              f"Glm4MoeForCausalLM.from_pretrained({str(air_folder)!r}, dtype='float32', progress=False); "
              f"print(sorted(m for m in ('torch._dynamo', 'triton') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"


# ---------------------------------------------------------------------- FP8
def quantize(weight: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    fp8_max = torch.finfo(torch.float8_e4m3fn).max
    if scheme == "channel":
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / fp8_max
        return (weight / scale).to(torch.float8_e4m3fn), scale
    out_f, in_f = weight.shape
    rows, cols = -(-out_f // 128), -(-in_f // 128)
    padded = torch.zeros(rows * 128, cols * 128)
    padded[:out_f, :in_f] = weight
    blocks = padded.view(rows, 128, cols, 128)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / fp8_max
    q = (blocks / scale[:, None, :, None]).view(rows * 128, cols * 128)[:out_f, :in_f]
    return q.to(torch.float8_e4m3fn), scale


def is_quantized_linear(name: str, tensor: torch.Tensor) -> bool:
    skip = ("embed_tokens", "lm_head", "norm", "mlp.gate.weight")
    return name.endswith(".weight") and tensor.dim() == 2 and not any(s in name for s in skip)


@pytest.mark.parametrize("scheme", ["channel", "block"])
def test_fp8_checkpoints_stay_fp8(tmp_path, air_folder, scheme):
    folder = copy_checkpoint(air_folder, tmp_path / scheme)
    originals = {}

    dequantized = {}

    def to_fp8(tensors):
        for name in [n for n, t in tensors.items() if is_quantized_linear(n, t)]:
            originals[name] = tensors[name]
            q, scale = quantize(tensors[name], scheme)
            tensors[name] = q
            tensors[name + ("_scale" if scheme == "channel" else "_scale_inv")] = scale
            if scheme == "channel":
                dequantized[name] = q.float() * scale
            else:
                full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)
                dequantized[name] = q.float() * full[: q.shape[0], : q.shape[1]]

    rewrite_tensors(folder, to_fp8)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = (
        {"quant_method": "compressed-tensors", "format": "float-quantized"} if scheme == "channel"
        else {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    )
    (folder / "config.json").write_text(json.dumps(config))
    assert len(originals) > 50

    # Kept in FP8 with its scales (no flag: read from quantization_config); "none" dequantizes at load.
    model = Glm4MoeForCausalLM.from_pretrained(folder, dtype="float32", progress=False)
    packed_q = model.model.layers[0].self_attn.q_proj.packed
    packed_experts = model.model.layers[1].mlp.experts.weights()[0]
    assert packed_q.format == "fp8" and packed_q.data.dtype == torch.float8_e4m3fn
    assert scheme == "block" or packed_experts.format == "fp8"
    # Block scales are kept as stored; an expert stack whose gate and up rows would share a 128-row scale block
    # (this tiny model's 32-row experts) is kept dequantized instead.
    assert packed_q.block == (0 if scheme == "channel" else 128)
    if scheme == "block":
        assert isinstance(packed_experts, torch.nn.Parameter)
        packed_experts = PackedWeight("fp8", packed_experts.detach(), torch.ones(packed_experts.shape[:2]))
    assert isinstance(model.lm_head.weight, torch.nn.Parameter)  # not quantized in FP8 releases: kept as shipped
    # ...unless the heads are given a format: packed from the shipped bf16, the FP8 weights kept as stored
    head8 = Glm4MoeForCausalLM.from_pretrained(folder, dtype="float32", progress=False, lm_head_quantization="int8")
    assert head8.lm_head.packed.format == "int8"
    assert torch.equal(head8.model.layers[0].self_attn.q_proj.packed.data, packed_q.data)
    torch.testing.assert_close(head8.lm_head.packed.dequantize(), model.lm_head.weight, rtol=0, atol=2e-3)
    dense = Glm4MoeForCausalLM.from_pretrained(folder, dtype="float32", progress=False, quantization="none")
    torch.testing.assert_close(dense.model.layers[0].self_attn.q_proj.weight, packed_q.dequantize())
    # GPTQ calibration reads the FP8 weights dequantized, a layer at a time.
    calibrated = calibrate(folder, "int4", None, [type("Record", (), {"input_ids": [5, 9, 11, 2, 7, 3]})()],
                           dtype="float32")
    assert calibrated.model.layers[0].self_attn.q_proj.packed.format == "int4"
    assert torch.isfinite(calibrated(torch.tensor([[5, 9, 11]]))).all()
    q_proj = packed_q.dequantize()
    expert = packed_experts.dequantize()[3, :32]
    for got, name in [(q_proj, "model.layers.0.self_attn.q_proj.weight"),
                      (expert, "model.layers.1.mlp.experts.3.gate_proj.weight")]:
        want = originals[name]
        # e4m3 keeps 3 mantissa bits: a relative error of at most 2^-4, plus the subnormal step.
        assert ((got - want).abs() <= want.abs() / 16 + want.abs().max() / 448 * 2**-9 + 1e-7).all()
    # The logits are those of the original model with every weight replaced by W_fp8 · scale...
    plain = Glm4MoeForCausalLM.from_pretrained(air_folder, dtype="float32", progress=False)
    original_logits = logits(plain)
    fake_quant = copy_checkpoint(air_folder, tmp_path / "fake")
    rewrite_tensors(fake_quant, lambda tensors: tensors.update(dequantized))
    expected = logits(Glm4MoeForCausalLM.from_pretrained(fake_quant, dtype="float32", progress=False))
    got = logits(model)
    assert torch.allclose(got, expected, atol=1e-5)
    # ...which stay within FP8 error of the original (e4m3 ≈ 3% per weight, compounded over 3 layers).
    assert (got - original_logits).abs().mean() / original_logits.abs().mean() < 0.15


def test_dequantize_fp8_rejects_mismatched_scale():
    with pytest.raises(CheckpointError, match="cannot read FP8 scale"):
        dequantize_fp8(torch.zeros(4, 6, dtype=torch.float8_e4m3fn), torch.ones(3, 5))


# ---------------------------------------------------------------------- damaged checkpoints
def test_missing_tensor_is_named(tmp_path, air_folder):
    folder = copy_checkpoint(air_folder, tmp_path / "c")
    rewrite_tensors(folder, lambda t: t.pop("model.layers.1.mlp.experts.7.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.experts\.7\.up_proj"):
        Glm4MoeForCausalLM.from_pretrained(folder, progress=False)


def test_extra_tensor_is_named(tmp_path, air_folder):
    folder = copy_checkpoint(air_folder, tmp_path / "c")
    rewrite_tensors(folder, lambda t: t.update({"model.layers.0.self_attn.surprise": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.layers\.0\.self_attn\.surprise"):
        Glm4MoeForCausalLM.from_pretrained(folder, progress=False)


def test_wrong_shape_is_named(tmp_path, air_folder):
    folder = copy_checkpoint(air_folder, tmp_path / "c")
    rewrite_tensors(folder, lambda t: t.update({"model.norm.weight": torch.ones(63)}))
    with pytest.raises(CheckpointError, match=r"wrong shapes: model\.norm\.weight is \[63\], expected \[64\]"):
        Glm4MoeForCausalLM.from_pretrained(folder, progress=False)


def test_truncated_file(tmp_path, air_folder):
    folder = copy_checkpoint(air_folder, tmp_path / "c")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        Glm4MoeForCausalLM.from_pretrained(folder, progress=False)


def test_corrupt_header(tmp_path, air_folder):
    folder = copy_checkpoint(air_folder, tmp_path / "c")
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"garbage!"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        Glm4MoeForCausalLM.from_pretrained(folder, progress=False)


def test_not_a_safetensors_file(tmp_path, air_folder):
    folder = copy_checkpoint(air_folder, tmp_path / "c")
    (folder / "model.safetensors").write_bytes(b"\x01")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        Glm4MoeForCausalLM.from_pretrained(folder, progress=False)


def test_index_naming_a_missing_shard(tmp_path, air_folder):
    model = Glm4MoeForCausalLM.from_pretrained(air_folder, dtype="float32", progress=False)
    model.save_pretrained(tmp_path, max_shard_bytes=100_000)
    next(iter(sorted(tmp_path.glob("model-*.safetensors")))).unlink()
    with pytest.raises(CheckpointError, match="names files that are not in"):
        Glm4MoeForCausalLM.from_pretrained(tmp_path, progress=False)


def test_unknown_dtype(air_folder):
    with pytest.raises(ValueError, match="dtype 'int4' is not supported"):
        Glm4MoeForCausalLM.from_pretrained(air_folder, dtype="int4", progress=False)


def test_reference_checkpoint_in_bf16_loads_as_bf16(tmp_path):
    build_reference("air_like", dtype=torch.bfloat16).save_pretrained(tmp_path)
    model = Glm4MoeForCausalLM.from_pretrained(tmp_path, progress=False)  # dtype from config.json
    assert model.dtype == torch.bfloat16
    assert save_reference  # the float32 writer is shared with the parity tests
