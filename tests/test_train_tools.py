"""The pieces around training: the training expert forward, the evaluation's cached greedy decoding and format
check, the synthetic data's held-out splits, and the loss plot."""

import json

import pytest
import torch
import torch.nn.functional as F
from glm45_tiny.evaluate import format_ok, greedy_generate, mtp_acceptance
from glm45_tiny.plot import plot
from glm45_tiny.synthetic import (
    CITIES,
    HELDOUT_CITIES,
    HELDOUT_TASK_MIX,
    HELDOUT_TOOL_NOUNS,
    TRAIN_TASK_MIX,
    WEATHER_TOOL,
    WordPieces,
    generate,
)
from train_helpers import tiny_model_config

from glm45.model import Glm4MoeForCausalLM


@pytest.fixture
def model():
    model = Glm4MoeForCausalLM(tiny_model_config())
    model.init_weights(0.2, torch.Generator().manual_seed(0))
    return model.eval()


def test_grouped_expert_dispatch_matches_a_per_token_reference_in_values_and_gradients(model):
    experts = model.model.layers[1].mlp.experts
    x = torch.randn(10, 32, requires_grad=True)
    weights, ids = torch.rand(10, 2), torch.randint(0, 4, (10, 2))
    ids[:, 1] = (ids[:, 0] + 1) % 4
    out = experts(x, weights, ids)
    out.square().sum().backward()
    grads = (x.grad.clone(), experts.gate_up_proj.grad.clone())
    x.grad = None
    experts.gate_up_proj.grad = None

    rows = []
    for t in range(10):
        total = 0
        for k in range(2):
            gate, up = (experts.gate_up_proj[ids[t, k]] @ x[t]).chunk(2)
            total = total + weights[t, k] * (experts.down_proj[ids[t, k]] @ (F.silu(gate) * up))
        rows.append(total)
    reference = torch.stack(rows)
    torch.testing.assert_close(out, reference)
    reference.square().sum().backward()
    torch.testing.assert_close(grads[0], x.grad)
    torch.testing.assert_close(grads[1], experts.gate_up_proj.grad)


def test_cached_greedy_decoding_equals_full_recomputation(model):
    prompt = [5, 17, 42, 7, 99]
    generated, stopped = greedy_generate(model, prompt, stop_ids=set(), max_new_tokens=8)
    assert not stopped and len(generated) == 8
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert generated == ids[len(prompt):]
    stop = generated[3]
    first_stop = generated.index(stop)
    assert greedy_generate(model, prompt, {stop}, 8) == (generated[:first_stop + 1], True)
    accepted, drafted = mtp_acceptance(model, prompt, generated)
    assert drafted == len(generated) - 1 and 0 <= accepted <= drafted


def test_format_check():
    assert format_ok("\n<think>plan</think>\nanswer", thinking=True, stopped=True)
    assert format_ok("\n<think></think>\n<tool_call>f\n</tool_call>", thinking=True, stopped=True)
    assert not format_ok("\n<think>plan</think>\nanswer", thinking=True, stopped=False)
    assert not format_ok("\nanswer", thinking=True, stopped=True)
    assert not format_ok("\n<think>a</think>\n<think>b</think>\nanswer", thinking=True, stopped=True)
    assert format_ok("\nanswer", thinking=False, stopped=True)
    assert not format_ok("\n<think>x</think>\nanswer", thinking=False, stopped=True)


def test_held_out_splits_use_unseen_cities_and_tool_words():
    assert not set(CITIES) & set(HELDOUT_CITIES)
    train_text = json.dumps(generate(300, seed=0))
    assert not any(f'"{city}"' in train_text for city in HELDOUT_CITIES)
    assert not any(noun in train_text for noun in HELDOUT_TOOL_NOUNS)
    unseen = generate(20, seed=2, split="unseen_tools")
    assert all(c["meta"]["call"]["name"].split("_", 1)[1] in HELDOUT_TOOL_NOUNS for c in unseen)
    assert all(c["meta"]["call"]["name"] in {t["function"]["name"] for t in c["tools"]} for c in unseen)
    assert generate(5, seed=3) == generate(5, seed=3) and generate(5, seed=3) != generate(5, seed=4)
    with pytest.raises(ValueError, match="unknown split"):
        generate(1, seed=0, split="test")


def test_made_up_words_can_be_strung_from_the_tokenizers_word_pieces():
    vocabulary = ["Ġ", "pro", "ve", "ap", "lot", "ery", "t", "Or", "Par", "<think>", "ab1", "LOUD"] + HELDOUT_TOOL_NOUNS
    pieces = WordPieces(vocabulary)
    assert "pro" in pieces.lower and "Or" in pieces.capital and "ab1" not in pieces.lower
    assert "LOUD" not in pieces.capital and "Ġ" not in pieces.lower
    train = generate(400, seed=0, vocabulary=vocabulary)
    assert train == generate(400, seed=0, vocabulary=vocabulary) and train != generate(400, seed=0)
    names = {m["tool_calls"][0]["function"]["name"] for c in train for m in c["messages"] if m.get("tool_calls")}
    assert any(set(name.split("_")[0]) <= set("provelotery") for name in names)  # a verb made of pieces
    text = json.dumps(train).lower()
    assert not any(noun in text for noun in HELDOUT_TOOL_NOUNS)  # pieces never spell a held-out word
    assert generate(20, seed=2, split="heldout", vocabulary=vocabulary) == generate(20, seed=2, split="heldout")
    with pytest.raises(ValueError, match="letter-only pieces"):
        WordPieces(["<think>", "12"])


def test_weather_tasks_also_use_other_schemas_and_questions_without_a_unit():
    weather = [c for c in generate(600, seed=0) if c["meta"]["kind"] == "get_weather"]
    unitless = [c for c in weather if "unit" not in c["meta"]["call"]["arguments"]]
    assert unitless and len(unitless) < len(weather) / 2
    for conversation in unitless:  # the call carries the city only, and the declared tool does not require a unit
        schema = next(t for t in conversation["tools"] if t["function"]["name"] == "get_weather")["function"]
        assert schema["parameters"]["required"] == ["city"]
        question = next(m for m in conversation["messages"] if m["role"] == "user")["content"]
        assert conversation["meta"]["call"]["arguments"]["city"] in question
        assert not any(word in question.lower() for word in ("celsius", "fahrenheit"))
    schemas = {json.dumps(next(t for t in c["tools"] if t["function"]["name"] == "get_weather")) for c in weather}
    assert WEATHER_TOOL in [json.loads(s) for s in schemas] and len(schemas) > 5


def test_training_draws_its_own_task_mix_and_held_out_splits_keep_theirs():
    def shares(conversations):
        kinds = [c["meta"]["kind"] for c in conversations]
        fixed = {"chat", "get_weather", "calculator", "convert_units"}
        return {k: kinds.count(k) / len(kinds) for k in fixed} | {
            "random_tool": sum(k not in fixed for k in kinds) / len(kinds)}

    train, heldout = shares(generate(3000, seed=0)), shares(generate(3000, seed=0, split="heldout"))
    for name, kind in [("weather", "get_weather"), ("calculator", "calculator"), ("convert", "convert_units"),
                       ("random_tool", "random_tool"), ("chat", "chat")]:
        assert train[kind] == pytest.approx(TRAIN_TASK_MIX[name], abs=0.03)
        assert heldout[kind] == pytest.approx(HELDOUT_TASK_MIX[name], abs=0.03)
    assert sum(TRAIN_TASK_MIX.values()) == pytest.approx(1) and sum(HELDOUT_TASK_MIX.values()) == pytest.approx(1)


def test_plot_writes_a_png(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in [
        {"step": 1, "lm": 3.0, "expert_load_max_over_mean": {"a": 2.0}},
        {"step": 2, "lm": 2.0, "expert_load_max_over_mean": {"a": 1.4}},
        {"step": 2, "eval_lm_loss": 2.5}]) + "\n")
    out = plot([str(metrics)], ["run"], tmp_path / "loss.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="one label per file"):
        plot([str(metrics)], ["a", "b"], tmp_path / "x.png")


def test_gradient_checkpointing_gives_the_same_gradients_and_counts_routes_once(model):
    from glm45.train.balance import RouterMonitor
    from glm45.train.data import Batch
    from glm45.train.trainer import compute_losses, enable_gradient_checkpointing

    ids = torch.randint(0, 320, (2, 9))
    labels = torch.roll(ids, -1, 1)
    batch = Batch(ids, labels, torch.ones_like(ids, dtype=torch.bool))

    def run():
        monitor = RouterMonitor(model)
        loss = compute_losses(model, batch, 0.3, monitor)["loss"]
        with monitor.paused():
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        loads = {n: load.clone() for n, load in monitor.loads.items()}
        monitor.remove()
        return grads, loads

    plain_grads, plain_loads = run()
    enable_gradient_checkpointing(model)
    grads, loads = run()
    assert grads.keys() == plain_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], atol=1e-6, rtol=1e-5)
    for name in loads:
        assert torch.equal(loads[name], plain_loads[name])
