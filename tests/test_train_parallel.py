"""`glm45 train` under torchrun: two ranks take a step on two batches, like one process that accumulates the same
two batches, and rank 0 alone writes the metrics and the result. Full fine-tuning runs FSDP2 (each rank holds half
of the parameters, checkpoints are sharded and resume, the result is a whole HF checkpoint); LoRA replicates the
frozen base."""

import json
import os
import subprocess
import sys

import pytest
import torch
from glm45_tiny.synthetic import generate, write_jsonl
from tiny_checkpoints import save_reference
from train_helpers import make_tokenizer

from glm45.distributed import free_port
from glm45.model import Glm4MoeForCausalLM
from glm45.train.config import TrainConfig
from glm45.train.trainer import train


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def torchrun(settings_file, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
               str(free_port()), "-m", "glm45.cli", "train", "--config", str(settings_file)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def assert_same_weights(folder_a, folder_b, atol=1e-5):
    ours = Glm4MoeForCausalLM.from_pretrained(folder_a, progress=False).state_dict()
    reference = Glm4MoeForCausalLM.from_pretrained(folder_b, progress=False).state_dict()
    assert ours.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(ours[name], tensor, atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("lora", [False, True])
def test_two_ranks_train_like_one_process_accumulating_their_batches(tmp_path, lora):
    folder = save_reference("glm45_like", tmp_path / "base")
    make_tokenizer(folder)
    data = write_jsonl(generate(40, seed=9), tmp_path / "data.jsonl")
    # A constant learning rate after warmup, so that a run stopped at step 2 and resumed to 4 is the same run; Muon's
    # Newton–Schulz in float32, so that the ranks' float rounding of the gradients is not widened to bf16 steps.
    common = dict(data=str(data), model=str(folder), batch_tokens=2048, eval_fraction=0.0, log_every=1,
                  max_steps=4, warmup_steps=1, min_lr_ratio=1.0, lr=1e-2, threads=1, balance_gamma=1e-2,
                  lora_rank=2 if lora else 0, muon_ns_dtype="float32")
    single = train(TrainConfig(output_dir=str(tmp_path / "single"), grad_accum=2, **common))

    settings = tmp_path / "run.json"
    settings.write_text(json.dumps({**common, "output_dir": str(tmp_path / "ranks"), "grad_accum": 1}))
    torchrun(settings)

    one, two = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "ranks")
    assert [r["step"] for r in two] == [1, 2, 3, 4]  # rank 0 alone logs
    for a, b in zip(one, two, strict=True):
        assert b["tokens_per_s"] > 0
        assert a.keys() == b.keys()
        for key in ("lm", "loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (key, a, b)
    if lora:
        assert (tmp_path / "ranks" / "adapter" / "adapter_model.safetensors").is_file()
        return
    summary = json.loads((tmp_path / "ranks" / "summary.json").read_text())
    assert summary["world_size"] == 2
    # FSDP: each rank holds half of the parameter bytes (every unit's tensors split on dim 0, padding aside)
    assert summary["parameter_bytes_this_rank"] == pytest.approx(summary["parameter_bytes_whole"] / 2, rel=0.02)
    assert (tmp_path / "ranks" / "checkpoint" / "sharded").is_dir()
    assert_same_weights(tmp_path / "ranks" / "model", single["result"])

    # Stopped after 2 steps and resumed from the sharded checkpoint to 4: the same weights as the whole run.
    resumed = {**common, "output_dir": str(tmp_path / "resumed"), "grad_accum": 1}
    settings.write_text(json.dumps({**resumed, "max_steps": 2}))
    torchrun(settings)
    settings.write_text(json.dumps({**resumed, "resume": True}))
    torchrun(settings)
    assert [r["step"] for r in read_metrics(tmp_path / "resumed")] == [1, 2, 3, 4]
    assert_same_weights(tmp_path / "resumed" / "model", tmp_path / "ranks" / "model", atol=1e-6)
