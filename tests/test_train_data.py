"""Training data: reading JSONL with line-numbered errors, and loss masks that cover exactly the assistant spans."""

import json

import pytest
import torch
from glm45_tiny.synthetic import WEATHER_TOOL, generate
from train_helpers import make_tokenizer

from glm45.train.data import (
    assistant_spans,
    collate,
    length_bucketed_batches,
    load_conversations,
    tokenize_all,
    tokenize_conversation,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


TOOL_CONVERSATION = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo in celsius?"},
        {"role": "assistant", "content": "", "reasoning_content": "Call the tool.",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                          "arguments": {"city": "Oslo", "unit": "celsius"}}}]},
        {"role": "tool", "content": '{"temperature": 3}'},
        {"role": "assistant", "content": "It is 3°C.", "reasoning_content": "It says 3."},
    ],
    "tools": [WEATHER_TOOL],
    "enable_thinking": True,
}
# What the model writes in that conversation, each turn followed by the token that ends it.
EXPECTED_TRAINED = [
    "\n<think>Call the tool.</think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Oslo</arg_value>\n"
    "<arg_key>unit</arg_key>\n<arg_value>celsius</arg_value>\n</tool_call><|observation|>",
    "\n<think>It says 3.</think>\nIt is 3°C.<|endoftext|>",
]


def trained_pieces(example, tokenizer) -> list[str]:
    """Decode each maximal run of masked tokens."""
    pieces, run = [], []
    for token, trained in zip(example.input_ids, example.loss_mask, strict=True):
        if trained:
            run.append(token)
        elif run:
            pieces.append(tokenizer.decode(run, skip_special_tokens=False))
            run = []
    if run:
        pieces.append(tokenizer.decode(run, skip_special_tokens=False))
    return pieces


def test_mask_covers_exactly_the_assistant_turns_and_their_end_tokens(tokenizer):
    example = tokenize_conversation(TOOL_CONVERSATION, tokenizer)
    assert trained_pieces(example, tokenizer) == EXPECTED_TRAINED
    assert example.input_ids == tokenizer.encode(assistant_spans(TOOL_CONVERSATION)[0])


def test_nothink_mask_starts_after_the_closed_thought(tokenizer):
    conversation = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
                    "enable_thinking": False}
    text, _ = assistant_spans(conversation)
    assert text.endswith("<|user|>\nHi/nothink<|assistant|>\n<think></think>\nHello!<|endoftext|>")
    assert trained_pieces(tokenize_conversation(conversation, tokenizer), tokenizer) == ["\nHello!<|endoftext|>"]


def test_earlier_turns_lose_their_reasoning_like_the_template(tokenizer):
    conversation = {"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!", "reasoning_content": "greet"},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye!", "reasoning_content": "part"},
    ]}
    pieces = trained_pieces(tokenize_conversation(conversation, tokenizer), tokenizer)
    assert pieces == ["\n<think></think>\nHello!<|user|>", "\n<think>part</think>\nBye!<|endoftext|>"]


def test_generated_conversations_tokenize_consistently(tokenizer):
    for conversation in generate(50, seed=3):
        example = tokenize_conversation(conversation, tokenizer)
        assert sum(example.loss_mask) > 0
        assert not example.loss_mask[0]


def test_malformed_lines_fail_or_are_skipped_with_their_line_number(tmp_path, caplog):
    path = tmp_path / "data.jsonl"
    good = json.dumps(TOOL_CONVERSATION)
    path.write_text("\n".join([good, "{not json", json.dumps({"messages": [{"role": "user", "content": "x"}]}),
                               json.dumps({"messages": [{"role": "wizard", "content": "x"}]}), good]) + "\n")
    with pytest.raises(ValueError, match=r"data.jsonl:2: malformed"):
        load_conversations(path)
    with caplog.at_level("WARNING"):
        conversations = load_conversations(path, on_error="skip")
    assert len(conversations) == 2
    for line in (2, 3, 4):
        assert f"data.jsonl:{line}:" in caplog.text
    assert "at least one assistant message" in caplog.text and "role 'wizard'" in caplog.text
    with pytest.raises(ValueError, match="on_error"):
        load_conversations(path, on_error="ignore")


def test_collate_shifts_labels_and_masks_padding(tokenizer):
    example = tokenize_conversation(TOOL_CONVERSATION, tokenizer)
    batch = collate([example, example], pad_id=0)
    ids = torch.tensor(example.input_ids)
    trained = torch.tensor(example.loss_mask[1:])
    assert torch.equal(batch.labels[0, :-1][trained], ids[1:][trained])
    assert (batch.labels[0, :-1][~trained] == -100).all() and batch.labels[0, -1] == -100
    assert batch.num_loss_tokens == 2 * int(trained.sum())


def test_bucketed_batches_respect_the_token_budget(tokenizer):
    examples = [tokenize_conversation(c, tokenizer) for c in generate(40, seed=4)]
    batches = length_bucketed_batches(examples, max_tokens=2048, pad_id=0, seed=0)
    for _ in range(10):
        batch = next(batches)
        assert batch.input_ids.numel() <= 2048
    with pytest.raises(ValueError, match="batch budget"):
        next(length_bucketed_batches(examples, max_tokens=16, pad_id=0, seed=0))


def test_undecodable_and_odd_lines_are_reported_with_their_line_number(tmp_path, caplog, tokenizer):
    path = tmp_path / "data.jsonl"
    good = json.dumps(TOOL_CONVERSATION).encode()
    lines = [good, b'{"messages": "\xff\xfe"}', b"[1, 2]", b'{"messages": [1, 2]}', b"[" * 5000 + b"]" * 5000,
             json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                      {"role": "system", "content": "c"}]}).encode(), good]
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(ValueError, match=r"data.jsonl:2: malformed conversation: 'utf-8' codec"):
        load_conversations(path)
    with caplog.at_level("WARNING"):
        conversations = load_conversations(path, on_error="skip")
    for line in (2, 3, 4, 5):
        assert f"data.jsonl:{line}:" in caplog.text
    assert [c["source"].rsplit(":", 1)[1] for c in conversations][-1] == "7"
    # What loads but cannot be rendered is reported by its line too, when tokenizing.
    caplog.clear()
    with caplog.at_level("WARNING"):
        examples = tokenize_all(conversations, tokenizer, on_error="skip")
    assert len(examples) == 2 and len(conversations) == 3 and "data.jsonl:6:" in caplog.text
    with pytest.raises(ValueError, match=r"data.jsonl:6: cannot be rendered"):
        tokenize_all(conversations, tokenizer)
