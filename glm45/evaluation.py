"""`glm45 eval`: perplexity and mean token log-likelihood of a model on held-out text, as the engine serves it.

    glm45 eval [MODEL] --data held_out.jsonl [--output report.json] [--quantization Q] [--kv-cache-dtype D] …

Each line of the data is one record:
- a plain text, `{"text": "..."}`: every token after the first is scored (the first has no prediction). Put the
  model's own start before it with `--text-prefix '[gMASK]<sop>'`: the prefix is context, never scored;
- a conversation in the training format, `{"messages": [...], "tools": [...]}`: only the assistant spans are
  scored, exactly the tokens the training loss covers (`glm45.train.data.tokenize_conversation`'s mask).

The scores are the engine's prompt log-probabilities (`SamplingParams(prompt_logprobs=0)`, float32 log-softmax
at every prompt position), so they measure what `glm45 serve` serves: the same weights format, KV-cache dtype and
batched, chunked prefill — every engine flag applies. Records go through the engine a few batches at a time; a
record longer than the context is cut to `max_model_len - 1` tokens (the engine samples one token after each
prompt, which is dropped) and counted as truncated.

The report (printed as JSON; `--output` also writes it, with each record's scores) gives `tokens` scored,
`mean_logprob` (their mean log-likelihood, nats), `perplexity` = exp(−mean_logprob), and the engine settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


@dataclass
class Record:
    """One line of the data, tokenized: ids and, per id, whether its log-likelihood counts."""

    line: int
    input_ids: list[int]
    scored: list[bool]
    truncated: bool = False


@dataclass
class RecordScore:
    line: int
    tokens: int      # scored tokens
    logprob: float   # their summed log-likelihood (nats)


def read_records(path: str | Path, tokenizer, text_prefix: str = "", max_len: int | None = None) -> list[Record]:
    """Tokenize every line of a JSONL file of texts or conversations; a malformed line is a ValueError naming it."""
    from glm45.train.data import parse_conversation, tokenize_conversation

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file {path}")
    prefix = tokenizer.encode(text_prefix) if text_prefix else []
    records = []
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                if isinstance(raw, dict) and "text" in raw:
                    if not isinstance(raw["text"], str) or not raw["text"]:
                        raise ValueError("'text' must be a non-empty string")
                    text_ids = tokenizer.encode(raw["text"])
                    ids, scored = prefix + text_ids, [False] * len(prefix) + [True] * len(text_ids)
                elif isinstance(raw, dict) and "messages" in raw:
                    example = tokenize_conversation(parse_conversation(raw), tokenizer)
                    ids, scored = example.input_ids, example.loss_mask
                else:
                    raise ValueError("a record must be an object with 'text' or 'messages'")
            except (ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
                raise ValueError(f"{path}:{line_number}: {e}") from e
            record = Record(line_number, ids, scored)
            if max_len is not None and len(ids) > max_len:
                record = Record(line_number, ids[:max_len], scored[:max_len], truncated=True)
            records.append(record)
    if not records:
        raise ValueError(f"{path} has no records")
    return records


def score_records(engine, records: list[Record], progress: bool = True) -> list[RecordScore | None]:
    """Each record's scored tokens and summed log-likelihood (None for a record with nothing to score), from the
    engine's prompt log-probabilities; at most two batches of records are queued at a time."""
    from glm45.engine.sampling_params import SamplingParams

    window = 2 * engine.config.max_num_seqs
    scores: list[RecordScore | None] = [None] * len(records)
    todo = [i for i, r in enumerate(records) if any(r.scored[1:])]  # the first token is never predicted
    queue = iter(todo)
    in_flight: dict[str, int] = {}
    with tqdm(total=len(todo), desc="Scoring", unit="rec", disable=not progress) as bar:
        while True:
            while len(in_flight) < window and (index := next(queue, None)) is not None:
                # Only log-probabilities from the first scored token on: the unscored start of a conversation
                # (system prompt, tools) is then read from the prefix cache when another record computed it.
                first = records[index].scored.index(True, 1)
                params = SamplingParams(prompt_logprobs=0, prompt_logprobs_from=first, max_tokens=1, temperature=0)
                engine.add_request(f"eval-{index}", records[index].input_ids, params)
                in_flight[f"eval-{index}"] = index
            if not in_flight:
                break
            for output in engine.step():
                if output.finished:
                    index = in_flight.pop(output.request_id)
                    scores[index] = _record_score(records[index], output.prompt_logprobs)
                    bar.update(1)
    return scores


def _record_score(record: Record, entries: list[dict[int, float] | None]) -> RecordScore:
    # entries[p] is log p(token p | tokens before it); the first token has none.
    positions = [p for p in range(1, len(record.input_ids)) if record.scored[p]]
    total = math.fsum(entries[p][record.input_ids[p]] for p in positions)
    return RecordScore(record.line, len(positions), total)


def summarize(records: list[Record], scores: list[RecordScore | None]) -> dict[str, Any]:
    scored = [s for s in scores if s is not None]
    tokens = sum(s.tokens for s in scored)
    total = math.fsum(s.logprob for s in scored)
    mean = total / tokens if tokens else float("nan")
    return {
        "records": len(scored),
        "skipped": len(records) - len(scored),  # nothing to score (e.g. a one-token text)
        "truncated": sum(r.truncated for r in records),
        "tokens": tokens,
        "logprob": total,
        "mean_logprob": mean,
        "perplexity": math.exp(-mean) if tokens else float("nan"),
    }


def evaluate(engine, data: str | Path, text_prefix: str = "", progress: bool = True) -> dict[str, Any]:
    """The report for one data file on a loaded `LLMEngine` (its `per_record` list has each record's scores)."""
    if engine.tokenizer is None:
        raise ValueError("glm45 eval needs the model's tokenizer, and this model folder has none")
    started = time.perf_counter()
    records = read_records(data, engine.tokenizer, text_prefix, max_len=engine.max_model_len - 1)
    if any(r.truncated for r in records):
        logger.warning("%d record(s) longer than max_model_len - 1 = %d tokens were cut to it",
                       sum(r.truncated for r in records), engine.max_model_len - 1)
    scores = score_records(engine, records, progress)
    seconds = time.perf_counter() - started
    prompt_tokens = sum(len(r.input_ids) for r in records)  # scored or context, computed or from the prefix cache
    report = {"model": str(engine.model_path), "data": str(data), **summarize(records, scores),
              "prompt_tokens": prompt_tokens, "seconds": round(seconds, 3),
              "prompt_tokens_per_second": round(prompt_tokens / seconds, 1),
              "engine": {k: v for k, v in dataclasses.asdict(engine.config).items() if k != "model"}}
    report["per_record"] = [dataclasses.asdict(s) for s in scores if s is not None]
    return report


# ---------------------------------------------------------------------------------------------------
# The command line


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    from glm45.cli_args import add_dataclass_arguments
    from glm45.config import EngineConfig

    parser.add_argument("model_positional", nargs="?", metavar="MODEL",
                        help="a local model folder; default: the bundled small model")
    parser.add_argument("--model", default=None, help="the model folder (same as the positional MODEL)")
    parser.add_argument("--data", required=True, metavar="FILE",
                        help='JSONL, one record a line: {"text": ...} or {"messages": [...], "tools": [...]}')
    parser.add_argument("--output", default=None, metavar="FILE",
                        help="also write the report here, with each record's scores")
    parser.add_argument("--text-prefix", default="",
                        help="context before every plain text, never scored (e.g. '[gMASK]<sop>')")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_dataclass_arguments(parser, EngineConfig, skip=("model",))


def cmd_eval(args: argparse.Namespace) -> int:
    from glm45.cli_args import dataclass_from_args
    from glm45.config import EngineConfig
    from glm45.engine.engine import LLMEngine

    if args.model and args.model_positional and args.model != args.model_positional:
        raise ValueError(f"two different models given: {args.model_positional!r} and --model {args.model!r}")
    if not Path(args.data).is_file():
        raise FileNotFoundError(f"no data file {args.data}")
    engine = LLMEngine(dataclass_from_args(EngineConfig, args, model=args.model or args.model_positional))
    try:
        report = evaluate(engine, args.data, args.text_prefix, args.progress)
    finally:
        engine.shutdown()
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in report.items() if k != "per_record"}, indent=2))
    return 0
