"""GRPO (`glm45 rl`): the advantages and the loss against hand computations on a fixed batch, and on a toy task
with a known optimum (completions made of even token ids score 1) the reward rises under rollouts from the engine;
LoRA runs, and a resumed run repeats an uninterrupted one."""

import json
import math

import pytest
import torch
from train_helpers import make_tokenizer, tiny_model_config

from glm45.cli import main as cli_main
from glm45.model import Glm4MoeForCausalLM
from glm45.train.grpo import group_advantages, policy_loss
from glm45.train.rl import rl
from glm45.train.rl_config import RLConfig
from glm45.train.rollout import load_reward, parse_prompt_row

REWARD = '''
SEEN = []

def even_tokens(prompt, completion, **fields):
    assert set(prompt) == {"messages", "tools", "enable_thinking"} and fields == {"kind": "toy"}
    assert {"text", "reasoning_content", "content", "tool_calls", "finish_reason", "token_ids"} <= set(completion)
    ids = completion["token_ids"]
    return sum(t % 2 == 0 for t in ids) / max(1, len(ids))
'''


def test_group_advantages_are_rewards_normalised_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    advantages = group_advantages(rewards, group_size=4)
    std = math.sqrt(((0.5 ** 2) * 4) / 3)  # Bessel's correction, as TRL
    expected = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4), 0, 0, 0, 0]
    torch.testing.assert_close(advantages, torch.tensor(expected))
    torch.testing.assert_close(group_advantages(rewards, 4, "none"), torch.tensor([.5, -.5, -.5, .5, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, 3)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_policy_loss_matches_a_hand_computation(loss_type):
    # Two completions of 2 and 3 tokens; the third token's ratio e^0.5 ≈ 1.65 is clipped at 1.2 for A > 0.
    logp = torch.tensor([-1.0, -2.0, -0.5, -1.5, -0.2], requires_grad=True)
    old = torch.tensor([-1.1, -2.0, -1.0, -1.5, -0.1])
    ref = torch.tensor([-1.0, -1.0, -0.7, -2.0, -0.2])
    advantages = torch.tensor([1.5, -0.5])
    lengths, epsilon, beta = [2, 3], 0.2, 0.1
    out = policy_loss(logp, old, advantages, ref, lengths, epsilon, beta, loss_type, normaliser=4.0)

    per_token, owner = [], [0, 0, 1, 1, 1]
    for t in range(5):
        ratio = math.exp(float(logp[t].detach()) - float(old[t]))
        a = float(advantages[owner[t]])
        surrogate = min(ratio * a, min(max(ratio, 1 - epsilon), 1 + epsilon) * a)
        d = float(ref[t]) - float(logp[t].detach())
        per_token.append(-surrogate + beta * (math.exp(d) - d - 1))
    if loss_type == "dapo":
        expected = sum(per_token) / 4.0
    else:
        expected = (sum(per_token[:2]) / 2 + sum(per_token[2:]) / 3) / 4.0
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-6)
    assert out.clipped_tokens == 1 and out.tokens == 5
    kl = sum(math.exp(float(r - p)) - float(r - p) - 1 for r, p in zip(ref, logp.detach(), strict=True))
    assert out.kl_sum == pytest.approx(kl, rel=1e-6)
    out.loss.backward()  # ∂/∂logp of an unclipped token with ratio r and advantage a: −r·a (+ β·(1 − e^{q−p}))
    expected_grad = -math.exp(-1.0 + 1.1) * 1.5 + beta * (1 - math.exp(0.0))
    assert float(logp.grad[0]) == pytest.approx(expected_grad / (4.0 if loss_type == "dapo" else 8.0), rel=1e-5)


def test_prompt_rows_and_rewards_are_checked():
    row = parse_prompt_row({"prompt": [{"role": "user", "content": "hi"}], "expected": 3})
    assert row.fields == {"expected": 3} and row.enable_thinking
    with pytest.raises(ValueError, match="end with a user or tool message"):
        parse_prompt_row({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    with pytest.raises(ValueError, match="module:function"):
        load_reward("no_colon")
    with pytest.raises(ValueError, match="cannot import"):
        load_reward("no_such_module_xyz:f")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A random tiny model with a tokenizer, prompts and the even-token reward."""
    folder = tmp_path_factory.mktemp("toy")
    model = Glm4MoeForCausalLM(tiny_model_config())
    model.init_weights(0.05, torch.Generator().manual_seed(0))
    model.save_pretrained(folder / "model")
    make_tokenizer(folder / "model")
    questions = ["Hello", "What is 2+2?", "Weather in Oslo?", "Name a colour.", "Say something.", "Count to three."]
    with (folder / "prompts.jsonl").open("w") as f:
        for q in questions:
            f.write(json.dumps({"messages": [{"role": "user", "content": q}], "enable_thinking": False,
                                "kind": "toy"}) + "\n")
    (folder / "toy_reward.py").write_text(REWARD)
    return folder


def settings(toy, out, **overrides):
    return RLConfig(**{**dict(data=str(toy / "prompts.jsonl"), model=str(toy / "model"), output_dir=str(out),
                              reward=f"{toy / 'toy_reward.py'}:even_tokens", num_generations=8, prompts_per_step=4,
                              max_completion_length=8, max_steps=10, lr=3e-3, optimizer="adamw", threads=1, seed=1,
                              balance_gamma=1e-3), **overrides})


def test_reward_rises_on_a_toy_task_with_a_known_optimum(toy, tmp_path):
    summary = rl(settings(toy, tmp_path / "run", lr=5e-2))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in records]
    assert len(rewards) == 10 and summary["steps"] == 10
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.25, rewards  # the optimum is 1.0, a start near 0.5
    assert all(r["rollout_tokens_per_s"] > 0 and r["completion_length"] <= 8 for r in records)
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "metrics.png").is_file()


def test_lora_with_a_kl_term_and_a_resumed_run_repeats_an_uninterrupted_one(toy, tmp_path):
    lora = dict(lora_rank=4, lora_alpha=8.0, lora_targets="q_proj,v_proj,experts", beta=0.05, num_iterations=2,
                loss_type="grpo", max_steps=4, lr=1e-2)
    whole = rl(settings(toy, tmp_path / "whole", **lora))
    assert (tmp_path / "whole" / "adapter" / "adapter_config.json").is_file()
    rl(settings(toy, tmp_path / "resumed", **{**lora, "max_steps": 2}))
    config = settings(toy, tmp_path / "resumed", **{**lora, "resume": True}).__dict__
    (tmp_path / "rl.json").write_text(json.dumps(config))
    assert cli_main(["rl", "--config", str(tmp_path / "rl.json")]) == 0
    one = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two, strict=True):
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-6) and "kl" in b
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-7)
    assert whole["steps"] == 4


def test_lora_rl_runs_data_parallel_under_torchrun(toy, tmp_path):
    import os
    import subprocess
    import sys

    from glm45.distributed import free_port

    config = settings(toy, tmp_path / "ranks", lora_rank=4, lora_alpha=8.0, max_steps=2, lr=1e-2).__dict__
    (tmp_path / "rl.json").write_text(json.dumps(config))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "glm45.cli", "rl", "--config", str(tmp_path / "rl.json")]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "ranks" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]  # rank 0 alone writes
    assert (tmp_path / "ranks" / "adapter" / "adapter_model.safetensors").is_file()


def test_full_fine_tuning_rl_runs_with_fsdp_under_torchrun(toy, tmp_path):
    import os
    import subprocess
    import sys

    from glm45.distributed import free_port

    config = settings(toy, tmp_path / "ranks", max_steps=2, lr=1e-2, num_iterations=2).__dict__
    (tmp_path / "rl.json").write_text(json.dumps(config))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "glm45.cli", "rl", "--config", str(tmp_path / "rl.json")]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "ranks" / "checkpoint" / "sharded").is_dir()
    trained = Glm4MoeForCausalLM.from_pretrained(tmp_path / "ranks" / "model", progress=False).state_dict()
    start = Glm4MoeForCausalLM.from_pretrained(toy / "model", progress=False).state_dict()
    assert trained.keys() == start.keys() and not torch.equal(trained["lm_head.weight"], start["lm_head.weight"])
