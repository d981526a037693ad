"""`glm45 train` under torchrun: two data-parallel ranks take a step on two batches, like one process that
accumulates the same two batches, and rank 0 alone writes the metrics and the model."""

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


@pytest.mark.parametrize("lora", [False, True])
def test_two_ranks_train_like_one_process_accumulating_their_batches(tmp_path, lora):
    folder = save_reference("glm45_like", tmp_path / "base")
    make_tokenizer(folder)
    data = write_jsonl(generate(40, seed=9), tmp_path / "data.jsonl")
    common = dict(data=str(data), model=str(folder), batch_tokens=2048, eval_fraction=0.0, log_every=1,
                  max_steps=4, warmup_steps=1, lr=1e-2, threads=1, balance_gamma=1e-2, lora_rank=2 if lora else 0)
    single = train(TrainConfig(output_dir=str(tmp_path / "single"), grad_accum=2, **common))

    settings = tmp_path / "run.json"
    settings.write_text(json.dumps({**common, "output_dir": str(tmp_path / "ranks"), "grad_accum": 1}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "glm45.cli", "train", "--config", str(settings)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    one, two = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "ranks")
    assert [r["step"] for r in two] == [1, 2, 3, 4]  # rank 0 alone logs
    for a, b in zip(one, two, strict=True):
        assert b["tokens_per_s"] > 0
        assert a.keys() == b.keys()
        for key in ("lm", "loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=2e-3), (key, a, b)
    if lora:
        assert (tmp_path / "ranks" / "adapter" / "adapter_model.safetensors").is_file()
        return
    ours = Glm4MoeForCausalLM.from_pretrained(tmp_path / "ranks" / "model", progress=False).state_dict()
    reference = Glm4MoeForCausalLM.from_pretrained(single["result"], progress=False).state_dict()
    for name, tensor in reference.items():
        torch.testing.assert_close(ours[name], tensor, atol=5e-4, rtol=1e-3, msg=name)
