"""`glm45 eval` on the bundled model against a hand computation: one uncached forward per record, the log-softmax
at the scored positions (every token after the prefix for texts, the training loss mask for conversations)."""

import json
import math

import pytest
import torch
from glm45_tiny.synthetic import generate

from glm45.cli import main
from glm45.config import bundled_model_path
from glm45.model import Glm4MoeForCausalLM
from glm45.tokenizer import Tokenizer
from glm45.train.data import parse_conversation, tokenize_conversation

PREFIX = "[gMASK]<sop>"
TEXTS = ["The weather in Paris is sunny today, and the temperature is 21 degrees.", "Hello"]
MAX_MODEL_LEN = 500


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    conversations = generate(4, seed=7, split="heldout")
    lines = [{"text": t} for t in TEXTS] + conversations + [{"text": "x"}]
    path = tmp_path_factory.mktemp("eval") / "data.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path, conversations


def by_hand(conversations) -> tuple[list[tuple[int, float]], int]:
    """(scored tokens, summed log-likelihood) per record, and how many were cut to max_model_len - 1 tokens."""
    folder = bundled_model_path()
    tokenizer, model = Tokenizer.from_pretrained(folder), Glm4MoeForCausalLM.from_pretrained(folder, dtype="float32")
    records = []
    for text in TEXTS + ["x"]:
        prefix, ids = tokenizer.encode(PREFIX), tokenizer.encode(text)
        records.append((prefix + ids, [False] * len(prefix) + [True] * len(ids)))
    for conversation in conversations:
        example = tokenize_conversation(parse_conversation(conversation), tokenizer)
        records.append((example.input_ids, example.loss_mask))
    records = [records[0], records[1], *records[3:], records[2]]  # file order: texts, conversations, "x"
    out, truncated = [], 0
    for ids, mask in records:
        if len(ids) > MAX_MODEL_LEN - 1:
            ids, mask, truncated = ids[:MAX_MODEL_LEN - 1], mask[:MAX_MODEL_LEN - 1], truncated + 1
        with torch.no_grad():
            logprobs = model(torch.tensor([ids]))[0].float().log_softmax(-1)
        positions = [p for p in range(1, len(ids)) if mask[p]]
        out.append((len(positions), math.fsum(float(logprobs[p - 1, ids[p]]) for p in positions)))
    return out, truncated


def test_glm45_eval_equals_a_hand_computation(data, tmp_path, capsys):
    path, conversations = data
    report_file = tmp_path / "report.json"
    code = main(["eval", "--data", str(path), "--output", str(report_file), "--text-prefix", PREFIX,
                 "--dtype", "float32", "--device", "cpu", "--max-model-len", str(MAX_MODEL_LEN),
                 "--max-num-batched-tokens", "64", "--num-gpu-blocks-override", "64", "--no-progress"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    report = json.loads(report_file.read_text())
    assert printed == {k: v for k, v in report.items() if k != "per_record"}
    expected, truncated = by_hand(conversations)
    scored = [(tokens, logprob) for tokens, logprob in expected if tokens]
    assert report["records"] == len(scored) == 7 and report["skipped"] == 0
    assert report["truncated"] == truncated > 0  # the long conversations are cut to the context
    assert report["tokens"] == sum(tokens for tokens, _ in scored)
    for record, (tokens, logprob) in zip(report["per_record"], scored, strict=True):
        assert record["tokens"] == tokens and abs(record["logprob"] - logprob) <= 1e-4
    mean = math.fsum(logprob for _, logprob in scored) / report["tokens"]
    assert report["mean_logprob"] == pytest.approx(mean, abs=1e-6)
    assert report["perplexity"] == pytest.approx(math.exp(-mean), rel=1e-6)
    assert report["engine"]["max_model_len"] == MAX_MODEL_LEN


def test_glm45_eval_names_a_malformed_line(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"prompt": "no"}\n', encoding="utf-8")
    assert main(["eval", "--data", str(path), "--device", "cpu", "--no-progress"]) == 2
    assert f"{path}:2: a record must be an object with 'text' or 'messages'" in capsys.readouterr().err
