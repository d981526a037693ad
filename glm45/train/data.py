"""Training data: JSONL conversations → token ids with a loss mask on the assistant's tokens → batches.

A line is one conversation in the shape the server accepts: `{"messages": [...], "tools": [...]}`, with
`reasoning_content` and `tool_calls` on assistant messages, and optionally `"enable_thinking": false`
for `/nothink` conversations. It is rendered with the GLM-4.5 chat template (`glm45.chat.render_chat`),
and the loss covers exactly what the model writes: each assistant turn after its generation prompt
(reasoning, content, tool calls) plus the token that ends the turn — the next `<|user|>` or
`<|observation|>`, or `<|endoftext|>` after the last turn.

Assistant spans are found by rendering prefixes, not by searching the text: the span of assistant message
i is what `render(messages[:i+1])` adds to `render(messages[:i], add_generation_prompt=True)`. The template
drops the reasoning of turns before the last user message; those turns are rendered the same way here
(without reasoning) so that every prefix is a prefix of the whole text. Every span starts right after an
added token (`<|assistant|>` or `</think>`) and ends right before one, so encoding the pieces one by one
gives the same ids as encoding the whole text; this is checked for every conversation.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from glm45.chat import normalize_messages, render_chat

T = TypeVar("T")

logger = logging.getLogger(__name__)

END_OF_CONVERSATION = "<|endoftext|>"
TURN_END_TOKENS = ("<|user|>", "<|observation|>", END_OF_CONVERSATION)
ON_ERROR_CHOICES = ("fail", "skip")


@dataclass
class Example:
    """One tokenized conversation: ids and, per id, whether the loss is taken when predicting it."""

    input_ids: list[int]
    loss_mask: list[bool]

    def __len__(self) -> int:
        return len(self.input_ids)


# ---------------------------------------------------------------------------------------------------
# Reading


def parse_conversation(record: Any) -> dict[str, Any]:
    """Check one JSONL record and return it as {messages, tools, enable_thinking}; ValueError if malformed."""
    if not isinstance(record, dict):
        raise ValueError(f"a conversation must be a JSON object, got {type(record).__name__}")
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("a conversation needs a non-empty 'messages' list")
    normalize_messages(messages)  # raises ValueError naming the bad message
    if not any(m.get("role") == "assistant" for m in messages):
        raise ValueError("a conversation needs at least one assistant message to train on")
    tools = record.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise ValueError(f"'tools' must be a list of tool definitions or null, got {type(tools).__name__}")
    enable_thinking = record.get("enable_thinking", True)
    if not isinstance(enable_thinking, bool):
        raise ValueError(f"'enable_thinking' must be true or false, got {enable_thinking!r}")
    return {"messages": messages, "tools": tools or None, "enable_thinking": enable_thinking}


def load_conversations(path: str | Path, on_error: str = "fail") -> list[dict[str, Any]]:
    """Read a JSONL file of conversations. A line that cannot be used — not UTF-8, not JSON, not a conversation —
    raises a ValueError naming its line number (`on_error="fail"`) or is logged with its line number and skipped
    (`on_error="skip"`). Each conversation keeps its `source` ("file:line") for later reports."""
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be one of {', '.join(ON_ERROR_CHOICES)}, got {on_error!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file {path}")
    conversations = []
    skipped = 0
    with path.open("rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                conversation = parse_conversation(json.loads(raw.decode("utf-8")))
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
                # UnicodeDecodeError and json.JSONDecodeError are ValueErrors
                skipped += _unusable(f"{path}:{line_number}: malformed conversation: {e}", on_error, e)
                continue
            conversation["source"] = f"{path}:{line_number}"
            conversations.append(conversation)
    if skipped:
        logger.warning("%s: skipped %d unusable line(s) of %d", path, skipped, skipped + len(conversations))
    if not conversations:
        raise ValueError(f"{path} has no usable conversations")
    return conversations


def read_records(path: str | Path, parse: Callable[[Any], T], what: str) -> list[T]:
    """`parse` applied to each non-blank line of a JSONL file; a line it cannot take is a ValueError naming its line
    number ("malformed {what}"), and a file with none is one too. For the DPO pairs and the RL prompts."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file {path}")
    records = []
    with path.open("rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if raw.strip():
                try:
                    records.append(parse(json.loads(raw.decode("utf-8"))))
                except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
                    raise ValueError(f"{path}:{line_number}: malformed {what}: {e}") from e
    if not records:
        raise ValueError(f"{path} has no {what}")
    return records


def _unusable(message: str, on_error: str, error: BaseException) -> int:
    """Fail with `message`, or log it and count one skipped item."""
    if on_error == "fail":
        raise ValueError(message + " (use --on-error skip to skip such lines)") from error
    logger.warning("%s (skipped)", message)
    return 1


# ---------------------------------------------------------------------------------------------------
# Rendering and loss masks


def _drop_hidden_reasoning(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The template shows reasoning only for turns after the last user message; drop it from the others
    so that rendering a prefix of the conversation gives a prefix of the whole rendering."""
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    out = []
    for i, m in enumerate(messages):
        if m.get("role") == "assistant" and i < last_user and m.get("reasoning_content"):
            m = {k: v for k, v in m.items() if k != "reasoning_content"}
        out.append(dict(m))
    return out


def assistant_spans(conversation: dict[str, Any]) -> tuple[str, list[tuple[int, int]]]:
    """(full text, [(start, end)] character spans the loss covers, each ending after the turn's end token)."""
    messages = _drop_hidden_reasoning(conversation["messages"])
    tools, thinking = conversation.get("tools"), conversation.get("enable_thinking", True)

    def render(upto: int, generation_prompt: bool) -> str:
        return render_chat(messages[:upto], tools, enable_thinking=thinking, add_generation_prompt=generation_prompt)

    text = render(len(messages), False)
    if messages[-1]["role"] == "assistant":
        text += END_OF_CONVERSATION
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, turn = render(i, True), render(i + 1, False)
        if not (turn.startswith(prompt) and text.startswith(turn)):
            raise ValueError(f"messages[{i}]: the rendered turn is not a prefix of the conversation; "
                             "cannot place its loss mask")
        end_token = next((t for t in TURN_END_TOKENS if text.startswith(t, len(turn))), None)
        if end_token is None:
            raise ValueError(f"messages[{i}]: an assistant turn must be followed by a user or tool message or end "
                             f"the conversation, found {text[len(turn):len(turn) + 20]!r}")
        spans.append((len(prompt), len(turn) + len(end_token)))
    return text, spans


def tokenize_conversation(conversation: dict[str, Any], tokenizer) -> Example:
    """Token ids of the rendered conversation and the loss mask over them (True on assistant tokens)."""
    text, spans = assistant_spans(conversation)
    ids: list[int] = []
    mask: list[bool] = []
    cursor = 0
    for start, end in spans:
        for piece, trained in ((text[cursor:start], False), (text[start:end], True)):
            piece_ids = tokenizer.encode(piece) if piece else []
            ids.extend(piece_ids)
            mask.extend([trained] * len(piece_ids))
        cursor = end
    if cursor < len(text):
        tail = tokenizer.encode(text[cursor:])
        ids.extend(tail)
        mask.extend([False] * len(tail))
    if ids != tokenizer.encode(text):
        raise ValueError("a token crosses an assistant span boundary; the loss mask would be misplaced")
    return Example(ids, mask)


def tokenize_all(conversations: Sequence[dict[str, Any]], tokenizer, max_len: int | None = None,
                 on_error: str = "fail") -> list[Example]:
    """Tokenize conversations; ones longer than `max_len` are truncated (and reported once). One that cannot be
    rendered or tokenized fails, or is skipped with `on_error="skip"`, named by its `source` line."""
    examples = []
    truncated = 0
    for conversation in conversations:
        try:
            example = tokenize_conversation(conversation, tokenizer)
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # e.g. a template error on odd messages
            where = conversation.get("source", "a conversation")
            _unusable(f"{where}: cannot be rendered and tokenized: {type(e).__name__}: {e}", on_error, e)
            continue
        if max_len is not None and len(example) > max_len:
            example = Example(example.input_ids[:max_len], example.loss_mask[:max_len])
            truncated += 1
        if any(example.loss_mask[1:]):
            examples.append(example)
    if truncated:
        logger.warning("truncated %d of %d conversations to %d tokens", truncated, len(conversations), max_len)
    return examples


# ---------------------------------------------------------------------------------------------------
# Batching


@dataclass
class Batch:
    """Right-padded rows: input_ids [B, T]; labels [B, T] = the next token, -100 where no loss is taken."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor  # [B, T] True on real tokens

    @property
    def num_loss_tokens(self) -> int:
        return int((self.labels != -100).sum())


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    width = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, example in enumerate(examples):
        n = len(example)
        ids = torch.tensor(example.input_ids, dtype=torch.long)
        input_ids[row, :n] = ids
        attention_mask[row, :n] = True
        # Position t predicts token t+1, which is trained when its mask is set.
        trained = torch.tensor(example.loss_mask[1:], dtype=torch.bool)
        labels[row, : n - 1] = torch.where(trained, ids[1:], torch.tensor(-100))
    return Batch(input_ids, labels, attention_mask)


def length_bucketed_batches(
    examples: Sequence[Example], max_tokens: int, pad_id: int, seed: int, bucket_factor: int = 50
) -> Iterator[Batch]:
    """Endless shuffled batches of similar-length conversations, each at most `max_tokens` padded tokens.

    Examples are shuffled, then sorted by length within windows of `bucket_factor` batches, cut into batches
    that fit the token budget, and the batches shuffled again: little padding, still random order."""
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    longest = max(len(e) for e in examples)
    if longest > max_tokens:
        raise ValueError(f"a conversation has {longest} tokens, more than the batch budget of {max_tokens}; "
                         "raise --batch-tokens or lower --max-seq-len")
    rng = random.Random(seed)
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        batches: list[list[int]] = []
        window = max(1, bucket_factor * max(1, max_tokens // max(1, longest)))
        for w in range(0, len(order), window):
            chunk = sorted(order[w:w + window], key=lambda i: len(examples[i]))
            current: list[int] = []
            for i in chunk:
                width = max([len(examples[j]) for j in current] + [len(examples[i])])
                if current and width * (len(current) + 1) > max_tokens:
                    batches.append(current)
                    current = []
                current.append(i)
            if current:
                batches.append(current)
        rng.shuffle(batches)
        for batch in batches:
            yield collate([examples[i] for i in batch], pad_id)


def fixed_batches(examples: Sequence[Example], max_tokens: int, pad_id: int) -> list[Batch]:
    """Deterministic batches over all examples once (for evaluation loss), sorted by length."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    batches, current = [], []
    for i in order:
        if current and len(examples[i]) * (len(current) + 1) > max_tokens:
            batches.append(collate([examples[j] for j in current], pad_id))
            current = []
        current.append(i)
    if current:
        batches.append(collate([examples[j] for j in current], pad_id))
    return batches
