"""The peer benchmark's pure helpers: the synthetic GGUF-conversion tokenizer, the bytes a decode step reads,
the table's median/range formatting and the targets read off it. No timing here; the benchmark itself is
`benchmarks/bench_peers.py`."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glm45_tiny.tokenizer_build import GLM45_ADDED_TOKENS  # noqa: E402

from benchmarks.models import SHAPES, decode_bytes_per_token  # noqa: E402
from benchmarks.report import (  # noqa: E402
    common_prefix,
    format_figure,
    format_median_range,
    median_range,
    pair_ratios,
    print_targets,
)
from benchmarks.synthetic_tokenizer import add_synthetic_tokenizer, build_synthetic_tokenizer  # noqa: E402
from glm45.config import ModelConfig  # noqa: E402
from glm45.model import Glm4MoeForCausalLM  # noqa: E402


def test_synthetic_tokenizer_has_the_exact_vocabulary_and_round_trips(tmp_path):
    from tokenizers import Tokenizer

    build_synthetic_tokenizer(1000, 900, tmp_path)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.get_vocab_size() == 1000
    for offset, (content, _) in enumerate(GLM45_ADDED_TOKENS):
        assert tok.token_to_id(content) == 900 + offset
    assert tok.token_to_id("<|reserved_63|>") == 999
    text = "[gMASK]<sop><|user|>\nHello, wörld! 12345 <think>ok</think> 😀"
    ids = tok.encode(text).ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert ids[:3] == [902, 904, 907]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["added_tokens_decoder"]["900"]["content"] == "<|endoftext|>"
    assert build_synthetic_tokenizer(1000, 900, tmp_path / "again") and (
        (tmp_path / "again" / "tokenizer.json").read_bytes() == (tmp_path / "tokenizer.json").read_bytes())


def test_synthetic_tokenizer_follows_the_config_and_refuses_other_eos_layouts(tmp_path):
    config = ModelConfig(**SHAPES["small"]).to_hf_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))
    add_synthetic_tokenizer(tmp_path)
    saved = json.loads((tmp_path / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in saved["added_tokens"]}
    assert [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]] == config["eos_token_id"]
    assert max(ids.values()) == config["vocab_size"] - 1

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(dict(config, eos_token_id=[16348, 16349])))
    with pytest.raises(ValueError, match="eos_token_id"):
        add_synthetic_tokenizer(bad)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_decode_bytes_count_the_weights_a_step_touches(shape):
    config = ModelConfig(**SHAPES[shape])
    with torch.device("meta"):
        model = Glm4MoeForCausalLM(config, with_mtp=False)
    expected = 0.0
    for name, param in model.named_parameters():
        if name == "model.embed_tokens.weight":
            expected += 2 * config.hidden_size
        elif ".experts." in name:  # routed experts: only k of E are read
            expected += 2 * param.numel() * config.num_experts_per_tok / config.n_routed_experts
        elif name.endswith("mlp.gate.weight"):  # the router, float32
            expected += 4 * param.numel()
        else:
            expected += 2 * param.numel()
    expected += 4 * config.num_moe_layers * config.n_routed_experts  # correction biases, float32
    assert decode_bytes_per_token(config, 2.0) == pytest.approx(expected, rel=1e-6)
    kv = config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * 2
    assert decode_bytes_per_token(config, 2.0, context=10) == pytest.approx(expected + 10 * kv, rel=1e-6)


def test_median_and_range_formatting():
    assert median_range([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)
    assert median_range([float("nan"), 4.0]) == (4.0, 4.0, 4.0)
    assert format_median_range([54.04, 52.9, 55.31]) == ("54.0", "52.9–55.3")
    assert format_median_range([float("nan")]) == ("n/a", "")
    assert [format_figure(v) for v in (1234.5, 56.78, 5.678, 0.1234)] == ["1234", "56.8", "5.68", "0.123"]
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2


def test_the_quality_tally_is_kl_divergence_and_paired_log_likelihood():
    """bench_quality's per-token figures against torch's KL divergence and the definitions."""
    import numpy as np

    from benchmarks.bench_quality import Tally

    gen = torch.Generator().manual_seed(0)
    reference = torch.log_softmax(torch.randn(50, 40, generator=gen, dtype=torch.float64), -1)
    other = torch.log_softmax(reference + 0.3 * torch.randn(50, 40, generator=gen, dtype=torch.float64), -1)
    ids = torch.randint(0, 40, (50,), generator=gen)
    tally = Tally()
    tally.add(other[:25].numpy(), reference[:25].numpy(), ids[:25].numpy())
    tally.add(other[25:].numpy(), reference[25:].numpy(), ids[25:].numpy())
    summary = tally.summary()
    kl = torch.nn.functional.kl_div(other, reference, log_target=True, reduction="none").sum(-1)
    assert summary["mean_kl"] == pytest.approx(kl.mean().item(), rel=1e-12)
    picked = other[torch.arange(50), ids]
    delta = picked - reference[torch.arange(50), ids]
    assert summary["perplexity"] == pytest.approx(np.exp(-picked.mean().item()), rel=1e-12)
    assert summary["mean_logprob_change"] == pytest.approx(delta.mean().item(), rel=1e-12)
    assert summary["change_stderr"] == pytest.approx(delta.std().item() / 50 ** 0.5, rel=1e-12)
    assert summary["same_top"] == (other.argmax(-1) == reference.argmax(-1)).double().mean().item()
    same = Tally()
    same.add(reference.numpy(), reference.numpy(), ids.numpy())
    assert same.summary()["mean_kl"] == 0 and same.summary()["same_top"] == 1


def test_mtp_target_is_read_off_the_paired_passes_too(capsys):
    """With `--mtp-paired` the MTP target is given twice: from the best-of medians and from the pairs' median."""
    import types

    record = {"results": [{"engine": "glm45 k=0"}, {"engine": "glm45 k=1", "mtp_pair_ratios": [1.5, 1.2, 1.45]},
                          {"engine": "glm45 k=1", "mtp_pair_ratios": [1.3, 1.6]}]}
    assert pair_ratios(record) == [1.2, 1.3, 1.45, 1.5, 1.6]
    args = types.SimpleNamespace(threads=[2], models=[], mtp_temperature=0.0, mtp_tool_constraint="off")
    medians = {(2, "bundled", "bf16", "mtp", "glm45 k=1"): 130.0, (2, "bundled", "bf16", "mtp", "glm45 k=0"): 100.0}
    print_targets(medians, args, pair_ratios(record))
    lines = capsys.readouterr().out.splitlines()
    assert any("(bundled, bs=1)" in line and "1.30  not met" in line for line in lines)
    assert any("paired passes' median" in line and "1.45  met" in line for line in lines)
    print_targets(medians, args, [])
    assert "paired" not in capsys.readouterr().out
