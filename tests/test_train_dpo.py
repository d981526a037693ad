"""DPO through `glm45 train --stage dpo`: the loss against a hand computation, the answer's log-probability summed over
its own tokens only, LLaMA-Factory's and TRL's row formats read alike, and a short run that learns to prefer the
chosen answers (held-out accuracy and margins logged as TRL names them)."""

import json
import math

import pytest
import torch
from glm45_tiny.synthetic import generate
from tiny_checkpoints import save_reference
from train_helpers import make_tokenizer

from glm45.model import Glm4MoeForCausalLM
from glm45.train.config import TrainConfig
from glm45.train.data import collate, tokenize_conversation
from glm45.train.dpo import dpo_loss, parse_pair, sequence_logprobs, tokenize_pairs
from glm45.train.trainer import train


def test_dpo_loss_matches_a_hand_computation():
    chosen, rejected = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    ref_chosen, ref_rejected = torch.tensor([-11.0, -4.5]), torch.tensor([-11.5, -2.0])
    loss, stats = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5)
    margins = [0.5 * ((-10 + 11) - (-12 + 11.5)), 0.5 * ((-4 + 4.5) - (-3 + 2))]  # 0.75, 0.75
    expected = sum(-math.log(1 / (1 + math.exp(-m))) for m in margins) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert stats["rewards/chosen"] == pytest.approx((0.5 + 0.25) / 2)
    assert stats["rewards/rejected"] == pytest.approx((-0.25 - 0.5) / 2)
    assert stats["rewards/margins"] == pytest.approx(0.75) and stats["rewards/accuracies"] == 1.0


PROMPT = [{"role": "user", "content": "Capital of Peru?"}]


@pytest.mark.parametrize("row", [
    {"messages": PROMPT, "chosen": {"role": "assistant", "content": "Lima."},  # LLaMA-Factory, OpenAI roles
     "rejected": {"role": "assistant", "content": "Oslo."}},
    {"conversations": [{"from": "human", "value": "Capital of Peru?"}],  # LLaMA-Factory, ShareGPT
     "chosen": {"from": "gpt", "value": "Lima."}, "rejected": {"from": "gpt", "value": "Oslo."}},
    {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": "Lima."}],  # TRL, conversational
     "rejected": [{"role": "assistant", "content": "Oslo."}]},
    {"prompt": "Capital of Peru?", "chosen": "Lima.", "rejected": "Oslo."},  # TRL, standard
    {"instruction": "Capital of Peru?", "chosen": "Lima.", "rejected": "Oslo."},  # LLaMA-Factory, alpaca
])
def test_preference_rows_of_both_projects_read_alike(row):
    pair = parse_pair(row)
    assert pair["prompt"] == PROMPT
    assert pair["chosen"] == [{"role": "assistant", "content": "Lima."}]
    assert pair["rejected"] == [{"role": "assistant", "content": "Oslo."}]


def test_bad_pairs_fail_clearly():
    with pytest.raises(ValueError, match="'chosen' and 'rejected'"):
        parse_pair({"prompt": "x", "chosen": "y"})
    with pytest.raises(ValueError, match="end before the assistant"):
        parse_pair({"messages": PROMPT + [{"role": "assistant", "content": "a"}], "chosen": "b", "rejected": "c"})
    with pytest.raises(ValueError, match="--stage"):
        TrainConfig(data="x", model="m", stage="ppo").validate()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = save_reference("glm45_like", tmp_path_factory.mktemp("base"))
    return folder, make_tokenizer(folder)


def test_answer_logprob_sums_its_own_tokens_only(base):
    folder, tokenizer = base
    model = Glm4MoeForCausalLM.from_pretrained(folder, dtype=torch.float32, progress=False).eval()
    earlier = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    pair = parse_pair({"messages": earlier + PROMPT, "chosen": "Lima.", "rejected": "Oslo."})
    example = tokenize_pairs([pair], tokenizer, 512)[0].chosen
    with torch.no_grad():
        total, count, _ = sequence_logprobs(model, collate([example], tokenizer.pad_token_id))
        logits = model(torch.tensor([example.input_ids]))[0].log_softmax(-1)
    trained = [t for t in range(1, len(example)) if example.loss_mask[t]]
    sft = tokenize_conversation({"messages": earlier + PROMPT + pair["chosen"], "tools": None}, tokenizer)
    assert sft.input_ids == example.input_ids and sum(sft.loss_mask) > len(trained)  # the earlier turn is not counted
    assert int(count[0]) == len(trained)
    manual = sum(float(logits[t - 1, example.input_ids[t]]) for t in trained)
    assert float(total[0]) == pytest.approx(manual, rel=1e-5)


def test_a_short_dpo_run_learns_to_prefer_the_chosen_answers(base, tmp_path):
    folder, _ = base
    rows = []
    for conversation in generate(60, seed=4):
        if conversation["meta"]["kind"] != "chat":
            continue
        messages = conversation["messages"]
        answer = messages[-1]["content"]
        rows.append({"messages": messages[:-1], "chosen": {"role": "assistant", "content": answer},
                     "rejected": {"role": "assistant", "content": answer[::-1]}, "tools": conversation["tools"],
                     "enable_thinking": False})
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = train(TrainConfig(data=str(data), model=str(folder), output_dir=str(tmp_path / "run"), stage="dpo",
                                pref_beta=0.1, max_steps=8, lr=3e-3, warmup_steps=1, batch_tokens=4096,
                                eval_fraction=0.25, eval_every=8, log_every=1, optimizer="adamw", mtp_weight=0.0))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "dpo" in r]
    assert steps[0]["dpo"] == pytest.approx(math.log(2), abs=1e-3)  # the policy starts as the reference
    assert steps[-1]["dpo"] < 0.5 and steps[-1]["rewards/accuracies"] > 0.8, steps[-1]
    evaluation = [r for r in records if "eval_dpo" in r][-1]
    assert evaluation["eval_rewards/margins"] > 0 and evaluation["eval_rewards/accuracies"] > 0.5
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file() and summary["steps"] == 8


def test_a_resumed_dpo_run_keeps_its_reference(base, tmp_path):
    folder, _ = base
    rows = [{"prompt": f"Say {w}.", "chosen": w, "rejected": w[::-1]} for w in ("alpha", "bravo", "delta", "nova")]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = dict(data=str(data), model=str(folder), output_dir=str(tmp_path / "run"), stage="dpo", lr=3e-3,
                  warmup_steps=1, eval_fraction=0.0, log_every=1, save_every=2, optimizer="adamw", mtp_weight=0.0)
    train(TrainConfig(max_steps=2, **common))
    state = torch.load(tmp_path / "run" / "checkpoint" / "state.pt", weights_only=False)
    assert len(state["extra"]["reference_logprobs"]) == 4
    summary = train(TrainConfig(max_steps=4, resume=True, **common))
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4] and summary["steps"] == 4
