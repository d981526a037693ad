"""Evaluation of a trained agent model on freshly generated held-out conversations: the bundled model's targets.

For each held-out conversation (a new seed, cities never seen in training, new numbers) the model generates
greedily from the prompt, as a server would:
- **tool accuracy**: after the user turn, exactly one call, to the right tool, with exactly the right
  arguments (parsed by `glm45.parsers.parse_tool_calls` with the tool schemas); also per kind of tool
  (get_weather declared as in `synthetic.WEATHER_TOOL` or in other words, calculator, convert_units, random);
- **answer accuracy**: after the reference call and its `<|observation|>` result, an answer that mentions the
  values of the result (temperature and condition, the number, the status);
- **format validity**: every output ends with an end-of-turn token; in thinking mode it is
  `\\n<think>…</think>\\n` then content, with `/nothink` it has no thinking tags at all;
- **unseen tools**: tools built from words never seen in training — the right tool name (and exact args);
- **MTP acceptance**: on each generated turn, how often the MTP head's greedy draft from (h_t, x_{t+1}) equals
  the model's own greedy token x_{t+2}, i.e. the first-position acceptance of greedy speculative decoding;
- **no call without tools**: every conversation that calls a tool is asked again with no tools declared; the answer
  must not contain `<tool_call>` (a model that writes one there answers a user with raw markup). The three requests
  of issue 20 ("What is 12*7?", "Compute 45+17", "What's the weather like in Paris?") are asked too, in both modes.
  These extra generations do not enter the other figures.

    python -m glm45_tiny.evaluate glm45/assets/glm45-tiny --num 300 --num-unseen 100 --seed 2
    ... --tool-call-constraint name    # decode tool calls as the server does by default (a declared name, chosen whole)
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from glm45.chat import render_chat
from glm45.engine.sampling_params import SamplingParams
from glm45.parsers import parse_reasoning, parse_tool_calls
from glm45_tiny.synthetic import FIXED_TOOLS, WEATHER_TOOL, generate

logger = logging.getLogger(__name__)
_FIXED_TOOL_NAMES = {tool["function"]["name"] for tool in FIXED_TOOLS}


class ContiguousCache:
    """The simplest KV cache for one sequence (implements the model's `AttentionContext`)."""

    def __init__(self, kv_cache_dtype: str = "auto"):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.fp8 = kv_cache_dtype == "fp8"  # K/V stored as e4m3 at scale 1 and widened on read, as the engine does

    def fork(self) -> ContiguousCache:
        """A copy that can grow apart from this one (the stored tensors are never changed in place)."""
        other = ContiguousCache()
        other.keys, other.values, other.fp8 = dict(self.keys), dict(self.values), self.fp8
        return other

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.fp8:
            k, v = (t.to(torch.float8_e4m3fn).to(t.dtype) for t in (k, v))
        if layer_idx in self.keys:
            k = torch.cat([self.keys[layer_idx], k])
            v = torch.cat([self.values[layer_idx], v])
        self.keys[layer_idx], self.values[layer_idx] = k, v
        num_new, num_all = q.shape[0], k.shape[0]
        # New token i sits at position num_all - num_new + i and sees every key up to itself.
        allowed = torch.ones(num_new, num_all, dtype=torch.bool).tril(num_all - num_new)
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                             v.transpose(0, 1)[None], attn_mask=allowed, enable_gqa=True)
        return out[0].transpose(0, 1)


@torch.no_grad()
def greedy_generate(model, prompt_ids: list[int], stop_ids: set[int], max_new_tokens: int,
                    constraint=None, kv_cache_dtype: str = "auto") -> tuple[list[int], bool]:
    """Greedy continuation of `prompt_ids` → (new ids including the stop token, stopped). With a `constraint`
    (`glm45.grammar.SequenceConstraint`), each token is chosen among those it allows, and a call's name among the
    declared ones as a whole (`glm45.engine.name_choice`), as the engine does."""
    from glm45.engine.logits import mask_row
    from glm45.engine.name_choice import choose_name, name_logprobs

    cache = ContiguousCache(kv_cache_dtype)
    ids = torch.tensor(prompt_ids)
    positions = torch.arange(len(prompt_ids))
    out: list[int] = []
    while len(out) < max_new_tokens:
        names = constraint.name_choices() if constraint is not None else None
        if names is not None:  # score each name after the pending token, then take the chosen one as known tokens
            scores = [name_logprobs(model(torch.cat([ids, torch.tensor(name)]),
                                          torch.arange(positions[0], positions[-1] + 1 + len(name)),
                                          cache.fork())[-len(name) - 1:-1], name) for name in names]
            name = names[choose_name(scores, GREEDY, None)]
            for token in name:
                constraint.accept(token)
            out += name
            ids = torch.cat([ids, torch.tensor(name)])
            positions = torch.arange(positions[0], positions[-1] + 1 + len(name))
        logits = model(ids, positions, cache)[-1]
        if constraint is not None:
            logits = mask_row(logits.clone(), constraint)
        token = int(logits.argmax())
        if constraint is not None:
            constraint.accept(token)
        out.append(token)
        if token in stop_ids:
            return out, True
        positions = positions[-1:] + 1
        ids = torch.tensor([token])
    return out, False


@torch.no_grad()
def mtp_acceptance(model, prompt_ids: list[int], generated: list[int]) -> tuple[int, int]:
    """(accepted, drafted): MTP drafts of x_{t+2} from (h_t, x_{t+1}) that equal the generated greedy token."""
    if model.mtp is None or len(generated) < 2:
        return 0, 0
    ids = torch.tensor([prompt_ids + generated])
    hidden = model.hidden_states(ids)
    positions = torch.arange(ids.shape[1] - 1)
    _, logits = model.mtp_draft(ids[:, 1:], hidden[:, :-1], positions)
    # Position t drafts token t+2; the generated tokens start at index len(prompt).
    first = len(prompt_ids) - 2 + 1  # the first draft whose pair (h_t, x_{t+1}) uses a generated x_{t+1}
    drafts = logits[0, first:].argmax(-1)
    targets = ids[0, first + 2:]
    drafts = drafts[: targets.numel()]
    return int((drafts == targets).sum()), int(targets.numel())


GREEDY = SamplingParams(temperature=0)
NO_TOOL_EXAMPLES = ("What is 12*7?", "Compute 45+17", "What's the weather like in Paris?")


def format_ok(text: str, thinking: bool, stopped: bool) -> bool:
    """Thinking mode: `\\n<think>…</think>\\n` then something; /nothink: a line of output without thinking tags."""
    if not stopped:
        return False
    if thinking:
        if not text.startswith("\n<think>") or text.count("<think>") != 1 or text.count("</think>") != 1:
            return False
        after = text.split("</think>", 1)[1]
        return after.startswith("\n") and after.strip() != ""
    return text.startswith("\n") and "<think>" not in text and "</think>" not in text and text.strip() != ""


class NoToolsCheck:
    """Asks a request with no tools declared and counts the answers without `<tool_call>` (no_tools_*)."""

    def __init__(self, model, tokenizer, stop_ids: set[int], max_new_tokens: int, counts: dict[str, int]):
        self.model, self.tokenizer, self.stop_ids, self.max_new_tokens = model, tokenizer, stop_ids, max_new_tokens
        self.counts = counts
        self.failures: list[dict[str, Any]] = []

    def ask(self, messages: list[dict[str, Any]], thinking: bool) -> str:
        prompt_ids = self.tokenizer.encode(render_chat(messages, None, enable_thinking=thinking))
        new, stopped = greedy_generate(self.model, prompt_ids, self.stop_ids, self.max_new_tokens)
        text = self.tokenizer.decode(new[:-1] if stopped else new, skip_special_tokens=False)
        self.counts["no_tools_total"] += 1
        self.counts["no_tools_no_call"] += "<tool_call>" not in text
        if "<tool_call>" in text and len(self.failures) < 20:
            self.failures.append({"request": messages[-1]["content"], "output": text})
        return text

    def issue_examples(self) -> list[dict[str, Any]]:
        """Issue 20's three requests, in both modes."""
        return [{"request": request, "thinking": thinking,
                 "output": self.ask([{"role": "user", "content": request}], thinking)}
                for request in NO_TOOL_EXAMPLES for thinking in (True, False)]


def evaluate(model_dir: str | Path, num: int = 300, num_unseen: int = 100, seed: int = 2,
             max_new_tokens: int = 192, limit_minutes: float = 0.0, no_tools: bool = True,
             tool_call_constraint: str = "off", kv_cache_dtype: str = "auto") -> dict[str, Any]:
    from glm45.model import Glm4MoeForCausalLM
    from glm45.tokenizer import Tokenizer

    model = Glm4MoeForCausalLM.from_pretrained(model_dir, dtype=torch.float32, progress=False).eval()
    tokenizer = Tokenizer.from_pretrained(model_dir)
    stop_ids = set(tokenizer.eos_token_ids)
    counts = {k: 0 for k in ("tool_total", "tool_right", "answer_total", "answer_right", "format_total",
                             "format_ok", "unseen_total", "unseen_name", "unseen_exact", "mtp_accepted",
                             "mtp_drafted", "no_tools_total", "no_tools_no_call")}
    by_kind: dict[str, list[int]] = {}  # tool kind → [exact calls, calls]
    failures: list[dict[str, Any]] = []
    format_failures: list[dict[str, Any]] = []
    conversations = generate(num, seed, "heldout") + (generate(num_unseen, seed, "unseen_tools") if num_unseen else [])
    started = time.perf_counter()

    grammar = None
    if tool_call_constraint != "off":
        from glm45.grammar import GrammarBackend, StructuredOutputsParams
        from glm45.grammar import tool_call_constraint as constrain

        grammar = GrammarBackend(tokenizer, model.config.vocab_size)

    def run(prompt: str, thinking: bool, tools: list | None = None) -> tuple[str, bool]:
        prompt_ids = tokenizer.encode(prompt)
        constraint = None
        if grammar is not None and tools:  # as `glm45 serve --tool-call-constraint` does with tool_choice "auto"
            spec = StructuredOutputsParams(tool_calls=constrain(tools, "auto", True, tool_call_constraint),
                                           reasoning=thinking)
            constraint = grammar.constraint(spec, prompt_ids, max_tokens=max_new_tokens)
        new, stopped = greedy_generate(model, prompt_ids, stop_ids, max_new_tokens, constraint, kv_cache_dtype)
        accepted, drafted = mtp_acceptance(model, prompt_ids, new)
        counts["mtp_accepted"] += accepted
        counts["mtp_drafted"] += drafted
        text = tokenizer.decode(new[:-1] if stopped else new, skip_special_tokens=False)
        counts["format_total"] += 1
        valid = format_ok(text, thinking, stopped)
        counts["format_ok"] += valid
        if not valid and len(format_failures) < 20:
            format_failures.append({"thinking": thinking, "prompt_end": prompt[-80:], "output": text})
        return text, stopped

    without_tools = NoToolsCheck(model, tokenizer, stop_ids, max_new_tokens, counts)

    for conv in tqdm(conversations, desc="evaluate"):
        if limit_minutes and time.perf_counter() - started > limit_minutes * 60:
            logger.warning("stopping early: --limit-minutes reached")
            break
        messages, tools, thinking, meta = conv["messages"], conv["tools"], conv["enable_thinking"], conv["meta"]
        prompt = render_chat(messages[:messages.index(next(m for m in messages if m["role"] == "user")) + 1],
                             tools, enable_thinking=thinking)
        text, _ = run(prompt, thinking, tools)
        if "call" not in meta:
            continue
        if no_tools:
            without_tools.ask(messages[:messages.index(next(m for m in messages if m["role"] == "user")) + 1],
                              thinking)
        _, content = parse_reasoning(text)
        _, calls = parse_tool_calls(content or "", tools)
        expected = meta["call"]
        name_right = len(calls) == 1 and calls[0]["name"] == expected["name"]
        exact = name_right and calls[0]["arguments"] == expected["arguments"]
        if meta["kind"] == "unseen_tool":
            counts["unseen_total"] += 1
            counts["unseen_name"] += name_right
            counts["unseen_exact"] += exact
        else:
            counts["tool_total"] += 1
            counts["tool_right"] += exact
            kind = meta["kind"] if meta["kind"] in _FIXED_TOOL_NAMES else "random tool"
            if kind == "get_weather" and WEATHER_TOOL not in tools:
                kind += " (other schema)"
            tally = by_kind.setdefault(kind, [0, 0])
            tally[0] += exact
            tally[1] += 1
        if not exact and len(failures) < 20:
            failures.append({"expected": expected, "output": text})
        # The answer from the tool result, after the reference call (teacher-forced like a real tool loop).
        tool_index = next(i for i, m in enumerate(messages) if m["role"] == "tool")
        answer_prompt = render_chat(messages[:tool_index + 1], tools, enable_thinking=thinking)
        answer_text, _ = run(answer_prompt, thinking, tools)
        _, answer = parse_reasoning(answer_text)
        if meta["kind"] != "unseen_tool":
            counts["answer_total"] += 1
            counts["answer_right"] += all(v in (answer or "") for v in meta["must_mention"])

    examples = without_tools.issue_examples() if no_tools else []

    def ratio(a: str, b: str) -> float:
        return round(counts[a] / counts[b], 4) if counts[b] else float("nan")

    return {
        "model": str(model_dir), "seed": seed, "conversations": len(conversations),
        "tool_call_constraint": tool_call_constraint,
        "tool_accuracy": ratio("tool_right", "tool_total"), "answer_accuracy": ratio("answer_right", "answer_total"),
        "format_validity": ratio("format_ok", "format_total"),
        "unseen_tool_name_accuracy": ratio("unseen_name", "unseen_total"),
        "unseen_tool_exact_accuracy": ratio("unseen_exact", "unseen_total"),
        "mtp_acceptance_first_position": ratio("mtp_accepted", "mtp_drafted"),
        "no_call_without_tools": ratio("no_tools_no_call", "no_tools_total"),
        "tool_accuracy_by_kind": {k: f"{right}/{total}" for k, (right, total) in sorted(by_kind.items())},
        "minutes": round((time.perf_counter() - started) / 60, 2), "counts": counts, "failures": failures,
        "format_failures": format_failures, "no_call_failures": without_tools.failures, "no_tool_examples": examples,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Evaluate an agent model on generated held-out conversations.")
    parser.add_argument("model", help="HF-layout model folder with its tokenizer")
    parser.add_argument("--num", type=int, default=300, help="held-out conversations (fixed tools, new cities)")
    parser.add_argument("--num-unseen", type=int, default=100, help="conversations with never-seen tools")
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=192,
                        help="longer than any reference turn (the longest, an unseen tool with a plan, is ~120)")
    parser.add_argument("--limit-minutes", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-tools", action=argparse.BooleanOptionalAction, default=True,
                        help="also ask every tool request with no tools declared (no_call_without_tools)")
    parser.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                        help="fp8: keys and values rounded to e4m3 as `glm45 serve --kv-cache-dtype fp8` stores them")
    parser.add_argument("--out", help="write the report as JSON here")
    parser.add_argument("--tool-call-constraint", choices=("off", "name", "full"), default="off",
                        help="decode as `glm45 serve --tool-call-constraint` does with tool_choice auto: once the "
                             "model opens <tool_call>, the name is a declared one chosen whole (and with full, the "
                             "arguments follow a grammar)")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO")
    torch.set_num_threads(args.threads)
    report = evaluate(args.model, args.num, args.num_unseen, args.seed, args.max_new_tokens, args.limit_minutes,
                      args.no_tools, args.tool_call_constraint, args.kv_cache_dtype)
    text = json.dumps(report, indent=2, ensure_ascii=False)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(json.dumps({k: v for k, v in report.items() if not k.endswith(("failures", "examples"))}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
