"""Tensor, expert and data parallelism over 2 gloo processes, against the single-process model.

One spawn (parallel_checks.spawn_target) runs every model-level check on one process group; the tests below
assert on what each rank measured. Shard reading and the split rules are also checked in this process.
"""

import pytest
import torch
import torch.multiprocessing as mp
from parallel_checks import spawn_target
from tiny_checkpoints import AIR_LIKE, save_reference

from glm45.config import ModelConfig
from glm45.distributed import ParallelGroup, free_port
from glm45.model import Glm4MoeForCausalLM
from glm45.model.checkpoint import Checkpoint
from glm45.model.shard import ShardSpec
from glm45.parallel import parallelize_model

WORLD = 2


def save_single_kv_head_model(folder):
    """Air-shaped, one KV head (fewer than ranks: replicated) and an MTP layer (sharded like a block)."""
    hf = {k: v for k, v in AIR_LIKE.items() if k != "rope_parameters"}
    config = ModelConfig.from_dict({**hf, "model_type": "glm4_moe", "rope_theta": 10000.0, "num_key_value_heads": 1,
                                    "num_attention_heads": 4, "num_nextn_predict_layers": 1})
    torch.manual_seed(0)
    model = Glm4MoeForCausalLM(config)
    model.init_weights(std=0.08)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {
        "glm45_like": save_reference("glm45_like", tmp_path_factory.mktemp("glm45_like")),
        "air_like": save_reference("air_like", tmp_path_factory.mktemp("air_like")),
        "one_kv_head_mtp": save_single_kv_head_model(tmp_path_factory.mktemp("kv1")),
    }


@pytest.fixture(scope="module")
def ranks(folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    mp.spawn(spawn_target, args=(WORLD, free_port(), folders, out), nprocs=WORLD)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.mark.parametrize("mode", ["tp", "ep"])
@pytest.mark.parametrize("kind", ["glm45_like", "air_like", "one_kv_head_mtp"])
def test_parallel_logits_equal_single_process(ranks, kind, mode):
    for results in ranks:
        entry = results[(kind, mode)]
        assert entry["logits_error"] < 1e-5, entry
        assert entry["same_argmax"]
        if "mtp_error" in entry:
            assert entry["mtp_error"] < 1e-5, entry


def test_kv_heads_split_or_replicated(ranks):
    for results in ranks:
        assert results[("glm45_like", "tp")]["kv_heads"] == 1      # 2 KV heads over 2 ranks
        assert results[("one_kv_head_mtp", "tp")]["kv_heads"] == 1  # 1 KV head, replicated


@pytest.mark.parametrize("mode", ["tp", "ep"])
@pytest.mark.parametrize("kind", ["glm45_like", "air_like"])
def test_each_rank_holds_about_half_of_the_sharded_parameters(ranks, kind, mode):
    for results in ranks:
        entry = results[(kind, mode)]
        assert entry["shards_own_memory"]
        assert entry["sharded_bytes"] == pytest.approx(entry["full_bytes_of_sharded"] / WORLD, rel=0.05)
        # the replicated rest (norms, routers) is small: the rank holds little more than half the model
        assert entry["total_bytes"] < 0.55 * entry["full_total_bytes"]
        assert entry["full_bytes_of_sharded"] > 0.9 * entry["full_total_bytes"]


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_data_parallel_steps_equal_one_step_on_the_combined_batch(ranks, mode):
    for results in ranks:
        steps = results[("train", mode)]
        assert len(steps) == 2
        for difference, moved in steps:
            assert moved > 1e-2  # the steps changed the weights...
            assert difference < 1e-6 * max(1.0, moved), steps  # ...identically


# ---------------------------------------------------------------------- in this process
def test_shards_read_from_the_checkpoint_reassemble_the_tensor(tmp_path):
    folder = save_reference("air_like", tmp_path)
    checkpoint = Checkpoint(folder)
    name = "model.layers.1.mlp.experts.3.gate_proj.weight"
    full, _ = checkpoint.weight(name, torch.float32)
    for dim in (0, 1):
        pieces = [checkpoint.weight(name, torch.float32, ShardSpec(dim, 4, i))[0] for i in range(4)]
        assert torch.equal(torch.cat(pieces, dim=dim), full)
    stacked = torch.cat([full, full + 1])
    gate_up = [ShardSpec(0, 2, i, parts=2).slice(stacked) for i in range(2)]
    assert torch.equal(gate_up[0], torch.cat([full[:16], full[:16] + 1]))  # the first half of gate, then of up
    with pytest.raises(ValueError, match="cannot be split"):
        ShardSpec(0, 3, 0).ranges(32)
    # a vocabulary the ranks do not divide: 31 rows → 16 + 15, the short piece padded with a zero row
    padded = [ShardSpec(0, 2, i, pad=True).slice(full[:31]) for i in range(2)]
    assert [p.shape[0] for p in padded] == [16, 16]
    assert torch.equal(torch.cat(padded)[:31], full[:31]) and not padded[1][15].any()


def test_fp8_shards_dequantise_like_the_whole_tensor():
    from glm45.model.checkpoint import dequantize_fp8, dequantize_fp8_shard

    weight = torch.randn(256, 384)
    quantized = weight.to(torch.float8_e4m3fn)
    for scale in (torch.rand(256, 1) + 0.5, torch.rand(2, 3) + 0.5, torch.tensor([0.7])):
        whole = dequantize_fp8(quantized, scale)
        for spec in (ShardSpec(0, 2, 1), ShardSpec(1, 3, 2), ShardSpec(0, 4, 1, parts=2), ShardSpec(1, 2, 0)):
            assert torch.equal(dequantize_fp8_shard(quantized, scale, spec, "w"), spec.slice(whole))


def test_unsplittable_sizes_are_a_clear_error(tmp_path):
    config = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         first_k_dense_replace=1, n_routed_experts=6, num_experts_per_tok=2, num_nextn_predict_layers=0)
    with torch.device("meta"):
        model = Glm4MoeForCausalLM(config)
    with pytest.raises(ValueError, match=r"=3 .*num_attention_heads \(4\).*allowed sizes: \[1, 2, 4\]"):
        parallelize_model(model, ParallelGroup(None, 0, 3))
    with pytest.raises(ValueError, match=r"n_routed_experts \(6\).*allowed sizes: \[1, 2\]"):
        parallelize_model(model, ParallelGroup(None, 0, 4), expert_parallel=True)
