"""What the 2-process parallelism tests run inside each spawned rank (gloo on CPU).

Spawning costs seconds on this machine, so one spawn runs every model-level check over one process group and
saves its measurements to `rank{r}.pt`; the tests in test_parallel.py assert on them.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from glm45.config import ModelConfig
from glm45.distributed import destroy_distributed, init_distributed
from glm45.model import Glm4MoeForCausalLM
from glm45.parallel import parallelize_model
from glm45.parallel.data_parallel import shard_for_training
from glm45.train.lora import apply_lora

IDS = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(1))


def spawn_target(rank: int, world_size: int, port: int, folders: dict[str, Path], out: Path) -> None:
    torch.set_num_threads(1)
    group, _ = init_distributed(torch.device("cpu"), rank, world_size, f"tcp://127.0.0.1:{port}")
    results: dict = {}
    try:
        for kind, folder in folders.items():
            model_checks(kind, folder, group, results)
        for mode in ("fsdp", "ddp"):
            results[("train", mode)] = data_parallel_check(mode, rank, world_size)
    finally:
        torch.save(results, out / f"rank{rank}.pt")
        destroy_distributed()


def parameter_bytes(model, names=None) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if names is None or n in names)


def model_checks(kind: str, folder: Path, group, results: dict) -> None:
    full = Glm4MoeForCausalLM.from_pretrained(folder, dtype="float32", progress=False)
    with torch.no_grad():
        expected = full(IDS)
        if full.mtp is not None:
            hidden = full.hidden_states(IDS)
            expected_draft = full.mtp_draft(IDS[:, 1:], hidden[:, :-1], torch.arange(IDS.shape[1] - 1))
    for mode in ("tp", "ep"):
        plan = {}

        def parallelize(model, plan=plan, expert_parallel=mode == "ep"):
            plan.update(parallelize_model(model, group, expert_parallel))
            return plan

        shard = Glm4MoeForCausalLM.from_pretrained(folder, dtype="float32", progress=False, parallelize=parallelize)
        with torch.no_grad():
            got = shard(IDS)
        entry = {
            "logits_error": float((got - expected).abs().max() / expected.abs().max()),
            "same_argmax": bool(torch.equal(got.argmax(-1), expected.argmax(-1))),
            "sharded_bytes": parameter_bytes(shard, plan),
            "full_bytes_of_sharded": parameter_bytes(full, plan),
            "total_bytes": parameter_bytes(shard),
            "full_total_bytes": parameter_bytes(full),
            # each shard owns exactly its bytes: no view pins the whole tensor (or the whole file map)
            "shards_own_memory": all(p.untyped_storage().nbytes() == p.numel() * p.element_size()
                                     for n, p in shard.named_parameters() if n in plan),
            "kv_heads": shard.model.layers[0].self_attn.num_kv_heads,
            "num_sharded": len(plan),
        }
        if full.mtp is not None:
            with torch.no_grad():
                hidden = shard.hidden_states(IDS)
                h, logits = shard.mtp_draft(IDS[:, 1:], hidden[:, :-1], torch.arange(IDS.shape[1] - 1))
            entry["mtp_error"] = float((logits - expected_draft[1]).abs().max() / expected_draft[1].abs().max())
        results[(kind, mode)] = entry


def tiny_training_model() -> Glm4MoeForCausalLM:
    config = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2,
                         num_nextn_predict_layers=1, use_qk_norm=True)
    torch.manual_seed(0)
    model = Glm4MoeForCausalLM(config)
    model.init_weights(std=0.1)
    return model


def training_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy plus the MTP layer's loss: every part of the model gets a gradient."""
    hidden = model.hidden_states(ids[:, :-1])
    logits = model.compute_logits(hidden)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    _, draft = model.mtp_draft(ids[:, 1:-1], hidden[:, :-1], torch.arange(ids.shape[1] - 2))
    return loss + 0.3 * F.cross_entropy(draft.reshape(-1, draft.shape[-1]), ids[:, 2:].reshape(-1))


def data_parallel_check(mode: str, rank: int, world_size: int) -> list[tuple[float, float]]:
    """Two steps of each rank on its half of the batch vs two steps of one model on the whole batch; returns,
    after each step, the largest parameter difference between them and how far the parameters moved.

    SGD with momentum, not Adam: Adam's first step is about lr·sign(g), which turns float32 rounding in a
    near-zero gradient into a visible difference; SGD keeps the comparison as exact as the gradients."""
    reference = tiny_training_model()
    if mode == "ddp":  # LoRA: the base frozen, adapters on the attention projections trained
        apply_lora(reference, rank=4, alpha=8.0)
        with torch.no_grad():  # adapters start with B = 0; make both factors matter from the first step
            for param in reference.parameters():
                if param.requires_grad:
                    param.normal_(0.0, 0.1)
    model = copy.deepcopy(reference)
    if mode == "ddp" and rank == 1:
        with torch.no_grad():  # replicas must start equal: rank 0's weights are broadcast
            model.lm_head.weight.add_(1.0)
    parallel = shard_for_training(model, mode)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5, momentum=0.9)
    ref_optimizer = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    initial = {name: t.clone() for name, t in reference.state_dict().items()}
    generator = torch.Generator().manual_seed(5)
    differences = []
    for _ in range(2):
        batch = torch.randint(0, 96, (4, 12), generator=generator)
        half = batch.shape[0] // world_size
        # two micro-batches per rank, as the trainer's gradient accumulation does
        for micro in batch[rank * half:(rank + 1) * half].split(1):
            (training_loss(model, micro) / half).backward()
        parallel.reduce_gradients()
        optimizer.step()
        optimizer.zero_grad()
        training_loss(reference, batch).backward()
        ref_optimizer.step()
        ref_optimizer.zero_grad()
        state = parallel.full_state_dict()
        difference = max(float((state[name] - ref).abs().max()) for name, ref in reference.state_dict().items())
        moved = max(float((initial[name] - ref).abs().max()) for name, ref in reference.state_dict().items())
        differences.append((difference, moved))
    return differences
