"""GPTQ calibration (`glm45 quantize --calibration`): its codes against round-to-nearest's on the layer's own
objective, the Hessians against the inputs a forward gives each weight, and the saved checkpoint end to end."""

import dataclasses
import json

import pytest
import torch
from glm45_tiny.synthetic import generate
from tiny_checkpoints import save_mtp_model

from glm45.cli import main as cli_main
from glm45.config import bundled_model_path
from glm45.evaluation import read_records
from glm45.model import Glm4MoeForCausalLM
from glm45.quant.calibration import part_hessians, recording
from glm45.quant.gptq import quantize_calibrated
from glm45.quant.packed import dequantize, quantize
from glm45.tokenizer import Tokenizer
from glm45.train.losses import mtp_hidden


def correlated_inputs(n: int, k: int, seed: int) -> torch.Tensor:
    """Inputs whose features are mixed and unevenly scaled, as a layer's real inputs are."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(k, k, generator=torch.Generator().manual_seed(99)) / k ** 0.5
    scales = torch.logspace(-1, 1, k)[torch.randperm(k, generator=torch.Generator().manual_seed(98))]
    return (torch.randn(n, k, generator=g) @ mixing + 0.3 * torch.randn(n, k, generator=g)) * scales


def output_error(w: torch.Tensor, packed, x: torch.Tensor) -> float:
    return float(((x @ (dequantize(packed) - w).T) ** 2).sum())


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_gptq_lowers_the_output_error_of_round_to_nearest_with_the_same_scales(fmt):
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0))
    x, unseen = correlated_inputs(4096, 256, seed=1), correlated_inputs(4096, 256, seed=2)
    nearest, calibrated = quantize(w, fmt), quantize_calibrated(w, fmt, x.T @ x)
    for field in ("scale", "minimum", "sub_scale", "sub_min"):  # the format and block scales stay as they were
        a, b = getattr(nearest, field), getattr(calibrated, field)
        assert (a is None and b is None) or torch.equal(a, b), field
    assert calibrated.data.dtype == nearest.data.dtype and calibrated.data.shape == nearest.data.shape
    assert output_error(w, calibrated, x) < 0.8 * output_error(w, nearest, x)  # about 0.7 for both formats
    assert output_error(w, calibrated, unseen) < 0.8 * output_error(w, nearest, unseen)  # inputs it did not see


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_with_a_diagonal_hessian_gptq_rounds_to_nearest(fmt):
    # Uncorrelated inputs give no direction to move an error into: every code is round-to-nearest's.
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(3))
    hessian = torch.diag(torch.rand(128, generator=torch.Generator().manual_seed(4)) + 0.1)
    hessian[5, 5] = 0.0  # an input no token used
    assert torch.equal(quantize_calibrated(w, fmt, hessian).data, quantize(w, fmt).data)


def test_an_expert_stack_is_calibrated_expert_by_expert():
    w = torch.randn(3, 32, 64, generator=torch.Generator().manual_seed(5))
    xs = [correlated_inputs(512, 64, seed=10 + e) for e in range(3)]
    hessians = torch.stack([x.T @ x for x in xs])
    hessians[1] = 0.0  # nothing was routed to expert 1
    stack = quantize_calibrated(w, "int4", hessians)
    assert torch.equal(stack.data[1], quantize(w[1], "int4").data)
    for e in (0, 2):
        assert torch.equal(stack.data[e], quantize_calibrated(w[e], "int4", hessians[e]).data)
    assert not torch.equal(stack.data[0], quantize(w[0], "int4").data)


def test_hessians_layer_by_layer_are_those_of_one_float_forward(tmp_path):
    folder = save_mtp_model(tmp_path / "m")
    records = [type("Record", (), {"input_ids": ids})() for ids in ([5, 9, 11, 2, 7], [1, 3, 3, 8])]
    reference = Glm4MoeForCausalLM.from_pretrained(folder, dtype="float32", progress=False)
    seen = {}
    experts = reference.model.layers[1].mlp.experts

    def grab(name):
        return lambda m, args: seen.setdefault(name, []).append(args)

    hooks = [reference.model.layers[0].self_attn.q_proj.register_forward_pre_hook(grab("q")),
             reference.lm_head.register_forward_pre_hook(grab("head")),
             experts.register_forward_pre_hook(grab("experts"))]
    with recording(reference, "") as expected, torch.no_grad():
        for record in records:
            ids = torch.tensor([record.input_ids])
            hidden = reference.hidden_states(ids)
            reference.compute_logits(hidden)
            reference.compute_mtp_logits(mtp_hidden(reference, hidden, ids))
    for hook in hooks:
        hook.remove()

    def gram(inputs):
        x = torch.cat([a[0].reshape(-1, a[0].shape[-1]) for a in inputs])
        return x.T @ x

    torch.testing.assert_close(expected["model.layers.0.self_attn.q_proj.weight"], gram(seen["q"]))
    torch.testing.assert_close(expected["lm_head.weight"], gram(seen["head"]))
    for e in range(experts.num_experts):
        x = torch.cat([a[0][(a[2] == e).any(-1)] for a in seen["experts"]])
        torch.testing.assert_close(expected["model.layers.1.mlp.experts.gate_up_proj"][e], x.T @ x)
    quantized = {n for n in reference.state_dict() if n.endswith(("_proj.weight", "head.weight"))
                 or n.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    assert set(expected) == quantized and any(n.startswith("mtp.") for n in expected)

    # One part at a time, from the checkpoint, beside a packed model: the same Hessians, and the tensors as stored.
    packed = Glm4MoeForCausalLM.from_pretrained(folder, dtype="float32", progress=False, quantization="int4")
    parts = list(part_hessians(packed, folder, records))
    hessians = {name: h for _, sums in parts for name, h in sums.items()}
    assert set(hessians) == set(expected)
    for name, h in expected.items():
        torch.testing.assert_close(hessians[name], h, rtol=1e-5, atol=1e-4)
    state = reference.state_dict()
    for tensors, _ in parts:
        for name, t in tensors.items():
            assert torch.equal(t, state[name]), name


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibration")
    path = folder / "calibration.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in generate(12, seed=5, split="train")), encoding="utf-8")
    return path


def mean_kl(model, reference, records) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for record in records:
            ids = torch.tensor([record.input_ids])
            p = torch.log_softmax(reference(ids)[0].double(), -1)
            q = torch.log_softmax(model(ids)[0].double(), -1)
            total += float((p.exp() * (p - q)).sum())
            count += len(record.input_ids)
    return total / count


def test_glm45_quantize_with_calibration_saves_gptq_codes_closer_to_float(calibration, tmp_path):
    folder = bundled_model_path()
    gptq, nearest = tmp_path / "gptq", tmp_path / "nearest"
    assert cli_main(["--log-level", "WARNING", "quantize", str(folder), "--to", "int4", "--out", str(gptq),
                     "--calibration", str(calibration), "--calibration-records", "8"]) == 0
    assert cli_main(["--log-level", "WARNING", "quantize", str(folder), "--to", "int4", "--out", str(nearest)]) == 0
    config = json.loads((gptq / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "int4" and config["calibration"] == "gptq"

    load = dict(dtype="float32", progress=False)
    reference = Glm4MoeForCausalLM.from_pretrained(folder, **load)
    calibrated, rounded = (Glm4MoeForCausalLM.from_pretrained(p, **load) for p in (gptq, nearest))
    records = read_records(calibration, Tokenizer.from_pretrained(folder))
    assert mean_kl(calibrated, reference, records[8:]) < mean_kl(rounded, reference, records[8:])  # held out
    # Only the codes differ: the scales a plain load would choose are the ones saved.
    a, b = calibrated.lm_head.packed, rounded.lm_head.packed
    assert torch.equal(a.scale, b.scale) and not torch.equal(a.data, b.data)
    assert dataclasses.replace(a, data=b.data).dequantize().equal(b.dequantize())


def test_bad_calibration_requests_fail_before_loading(calibration, tmp_path, capsys):
    folder = str(bundled_model_path())
    out = str(tmp_path / "x")
    assert cli_main(["quantize", folder, "--to", "fp8", "--out", out, "--calibration", str(calibration)]) == 2
    assert "--calibration chooses int8 or int4 codes" in capsys.readouterr().err
    assert cli_main(["quantize", folder, "--to", "int4", "--out", out, "--calibration", str(tmp_path / "no")]) == 2
    assert "no data file" in capsys.readouterr().err
    assert cli_main(["quantize", folder, "--to", "int4", "--out", out, "--calibration", str(calibration),
                     "--calibration-records", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err
    saved = tmp_path / "saved"
    assert cli_main(["--log-level", "WARNING", "quantize", folder, "--to", "int8", "--out", str(saved)]) == 0
    assert cli_main(["quantize", str(saved), "--to", "int4", "--out", out, "--calibration", str(calibration)]) == 2
    assert "already quantized" in capsys.readouterr().err
