"""DPO (direct preference optimisation, Rafailov et al. 2023) on preference pairs: `glm45 train --stage dpo`.

A pair is a prompt (a conversation that ends before the assistant's answer, optionally with `tools`) and two answers,
`chosen` and `rejected`. The rows of LLaMA-Factory and TRL are read as they are:
- prompt: `messages` (OpenAI roles), `conversations` (ShareGPT `from`/`value`: human, gpt, system, observation,
  function_call), TRL's `prompt` (a list of messages, or a string: one user message), or alpaca's `instruction`
  (+ `input`, `system`);
- `chosen` / `rejected`: an assistant message (OpenAI or ShareGPT keys), a list of messages (TRL's conversational
  format: the answer's turns), or a string (the answer's content).

Each answer is rendered after the prompt with the chat template, and its log-probability log π(y|x) is the sum over
the answer's tokens (its turns and the token that ends them, as in SFT). With the reference policy π_ref (the model
the run starts from, whose log-probabilities are computed once before the first step) and β = `--pref-beta`:

    loss = −log σ(β·[(log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x))])

plus `--pref-ftx` × the chosen answers' mean cross-entropy (LLaMA-Factory's SFT term) and `--mtp-weight` × the MTP
layer's loss on the chosen answers. Logged as TRL does: rewards/chosen = β·(log π − log π_ref) of y_c, rewards/rejected,
their margin and accuracy (the share of pairs where the chosen answer's reward is higher).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from glm45.chat import normalize_messages, render_chat
from glm45.train.data import Batch, Example, collate, read_records, tokenize_conversation

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "observation": "tool", "tool": "tool", "function_call": "assistant"}


def _message(m: Any, where: str) -> dict[str, Any]:
    if not isinstance(m, dict):
        raise ValueError(f"{where}: a message must be an object, got {type(m).__name__}")
    if "from" in m:  # ShareGPT
        role = SHAREGPT_ROLES.get(m["from"])
        if role is None:
            raise ValueError(f"{where}: unknown ShareGPT role {m['from']!r}; allowed: {', '.join(SHAREGPT_ROLES)}")
        if m["from"] == "function_call":
            call = json.loads(m["value"]) if isinstance(m["value"], str) else m["value"]
            return {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]}
        return {"role": role, "content": m.get("value", "")}
    return dict(m)


def _prompt_messages(record: dict[str, Any]) -> list[dict[str, Any]]:
    if "messages" in record or "conversations" in record:
        raw = record.get("messages", record.get("conversations"))
        messages = [_message(m, "prompt") for m in raw] if isinstance(raw, list) else raw
    elif "prompt" in record:
        raw = record["prompt"]
        messages = [{"role": "user", "content": raw}] if isinstance(raw, str) else \
            [_message(m, "prompt") for m in raw] if isinstance(raw, list) else raw
    elif "instruction" in record:
        text = record["instruction"] + ("\n" + record["input"] if record.get("input") else "")
        messages = ([{"role": "system", "content": record["system"]}] if record.get("system") else []) + \
            [{"role": "user", "content": text}]
    else:
        raise ValueError("a preference pair needs a prompt: 'messages', 'conversations', 'prompt' or 'instruction'")
    if not isinstance(messages, list) or not messages:
        raise ValueError("the prompt must be a non-empty list of messages")
    return messages


def _answer(value: Any, key: str) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        return [_message(value, key)]
    if isinstance(value, list) and value:
        return [_message(m, key) for m in value]
    raise ValueError(f"'{key}' must be an assistant message, a list of messages or a string, got {value!r:.60}")


def parse_pair(record: Any) -> dict[str, Any]:
    """One preference row → {prompt, chosen, rejected, tools, enable_thinking}; ValueError when malformed."""
    if not isinstance(record, dict):
        raise ValueError(f"a preference pair must be a JSON object, got {type(record).__name__}")
    missing = [k for k in ("chosen", "rejected") if k not in record]
    if missing:
        raise ValueError(f"a preference pair needs 'chosen' and 'rejected' answers; missing {missing}")
    prompt = _prompt_messages(record)
    chosen, rejected = _answer(record["chosen"], "chosen"), _answer(record["rejected"], "rejected")
    if prompt[-1].get("role") == "assistant":
        raise ValueError("the prompt must end before the assistant's answer (with a user or tool message)")
    for answer, key in ((chosen, "chosen"), (rejected, "rejected")):
        if answer[0].get("role") != "assistant":
            raise ValueError(f"'{key}' must start with an assistant message")
        normalize_messages(prompt + answer)
    tools = record.get("tools")
    if isinstance(tools, str):  # LLaMA-Factory stores tools as a JSON string
        tools = json.loads(tools)
    thinking = record.get("enable_thinking", True)
    if not isinstance(thinking, bool):
        raise ValueError(f"'enable_thinking' must be true or false, got {thinking!r}")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "tools": tools or None,
            "enable_thinking": thinking}


def load_pairs(path: str | Path) -> list[dict[str, Any]]:
    return read_records(path, parse_pair, "preference pair")


@dataclass
class PairExample:
    chosen: Example
    rejected: Example
    index: int  # position in the data, the key of its reference log-probabilities


def _answer_example(pair: dict[str, Any], answer: list[dict[str, Any]], tokenizer, max_len: int) -> Example:
    """The conversation prompt + answer, with the loss mask on the answer's tokens only (not the prompt's turns)."""
    conversation = {"messages": pair["prompt"] + answer, "tools": pair["tools"],
                    "enable_thinking": pair["enable_thinking"]}
    example = tokenize_conversation(conversation, tokenizer)
    prompt_text = render_chat(pair["prompt"], pair["tools"], enable_thinking=pair["enable_thinking"],
                              add_generation_prompt=True)
    start = len(tokenizer.encode(prompt_text))
    mask = [m and i >= start for i, m in enumerate(example.loss_mask)]
    return Example(example.input_ids[:max_len], mask[:max_len])


def tokenize_pairs(pairs: Sequence[dict[str, Any]], tokenizer, max_len: int) -> list[PairExample]:
    out = []
    for i, pair in enumerate(pairs):
        chosen = _answer_example(pair, pair["chosen"], tokenizer, max_len)
        rejected = _answer_example(pair, pair["rejected"], tokenizer, max_len)
        if any(chosen.loss_mask[1:]) and any(rejected.loss_mask[1:]):
            out.append(PairExample(chosen, rejected, i))
    return out


@dataclass
class PairBatch:
    """Chosen rows then rejected rows in one right-padded batch; `indices` of the pairs."""

    batch: Batch
    indices: list[int]


def collate_pairs(pairs: Sequence[PairExample], pad_id: int) -> PairBatch:
    return PairBatch(collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id), [p.index for p in pairs])


def pair_batches(pairs: Sequence[PairExample], max_tokens: int, pad_id: int, seed: int) -> Iterator[PairBatch]:
    """Endless shuffled batches of pairs whose padded chosen+rejected rows fit `max_tokens`."""
    longest = max(max(len(p.chosen), len(p.rejected)) for p in pairs)
    if 2 * longest > max_tokens:
        raise ValueError(f"a preference pair has an answer of {longest} tokens: its two rows need {2 * longest} "
                         f"padded tokens, more than --batch-tokens {max_tokens}")
    per_batch = max(1, max_tokens // (2 * longest))
    rng = random.Random(seed)
    order = list(range(len(pairs)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order), per_batch):
            yield collate_pairs([pairs[i] for i in order[start:start + per_batch]], pad_id)


def fixed_pair_batches(pairs: Sequence[PairExample], max_tokens: int, pad_id: int) -> list[PairBatch]:
    if not pairs:
        return []
    longest = max(max(len(p.chosen), len(p.rejected)) for p in pairs)
    per_batch = max(1, max_tokens // (2 * longest))
    return [collate_pairs(pairs[i:i + per_batch], pad_id) for i in range(0, len(pairs), per_batch)]


def sequence_logprobs(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of log π over each row's answer tokens [R], the answer-token counts [R], hidden states [R, T, D])."""
    hidden = model.hidden_states(batch.input_ids)
    keep = batch.labels != -100
    logits = model.compute_logits(hidden[keep]).float()
    token_logprobs = logits.log_softmax(-1).gather(-1, batch.labels[keep][:, None]).squeeze(-1)
    rows = torch.arange(batch.labels.shape[0])[:, None].expand_as(batch.labels)[keep]
    sums = torch.zeros(batch.labels.shape[0], dtype=token_logprobs.dtype).index_add(0, rows, token_logprobs)
    return sums, keep.sum(dim=1), hidden


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean sigmoid DPO loss over the pairs, and TRL's statistics (means over the pairs)."""
    reward_chosen = beta * (chosen - ref_chosen)
    reward_rejected = beta * (rejected - ref_rejected)
    loss = -F.logsigmoid(reward_chosen - reward_rejected).mean()
    stats = {"rewards/chosen": float(reward_chosen.detach().mean()),
             "rewards/rejected": float(reward_rejected.detach().mean()),
             "rewards/margins": float((reward_chosen - reward_rejected).detach().mean()),
             "rewards/accuracies": float((reward_chosen > reward_rejected).float().mean())}
    return loss, stats


@torch.no_grad()
def reference_logprobs(model, pairs: Sequence[PairExample], max_tokens: int, pad_id: int) -> dict[int, list[float]]:
    """{pair index: [log π_ref(chosen), log π_ref(rejected)]} with `model` as the reference (before training)."""
    was_training = model.training
    model.eval()
    out: dict[int, list[float]] = {}
    for pair_batch in fixed_pair_batches(pairs, max_tokens, pad_id):
        sums, _, _ = sequence_logprobs(model, pair_batch.batch)
        half = len(pair_batch.indices)
        for j, index in enumerate(pair_batch.indices):
            out[index] = [float(sums[j]), float(sums[half + j])]
    model.train(was_training)
    return out


def dpo_losses(model, pair_batch: PairBatch, reference: dict[int, list[float]], beta: float, ftx: float,
               mtp_weight: float) -> dict[str, torch.Tensor | float]:
    """{'loss': the total to minimise, 'dpo', 'lm' (chosen cross-entropy), 'mtp' (when on), TRL's statistics}."""
    from glm45.train.losses import masked_cross_entropy, mtp_hidden

    batch, half = pair_batch.batch, len(pair_batch.indices)
    sums, counts, hidden = sequence_logprobs(model, batch)
    ref = torch.tensor([reference[i] for i in pair_batch.indices], dtype=sums.dtype)
    loss, stats = dpo_loss(sums[:half], sums[half:], ref[:, 0], ref[:, 1], beta)
    out: dict[str, torch.Tensor | float] = {"dpo": loss, **stats}
    lm = -sums[:half].sum() / counts[:half].sum().clamp(min=1)  # the chosen answers' token-mean cross-entropy
    out["lm"] = lm
    total = loss + ftx * lm if ftx > 0 else loss
    if mtp_weight > 0 and model.mtp is not None and batch.input_ids.shape[1] >= 3:
        chosen_ids, chosen_labels = batch.input_ids[:half], batch.labels[:half]
        h = mtp_hidden(model, hidden[:half], chosen_ids)
        out["mtp"] = masked_cross_entropy(model.mtp.shared_head.head, h, chosen_labels[:, 1:])
        total = total + mtp_weight * out["mtp"]
    out["loss"] = total
    return out
