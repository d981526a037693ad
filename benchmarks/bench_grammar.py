"""What constrained decoding costs per token, against a decode step of the bundled model; and xgrammar against
llguidance on a 3,072- and a 151,552-token vocabulary (why glm45 uses xgrammar: `glm45/grammar/backend.py`).

    python benchmarks/bench_grammar.py                       # bundled model; 151k vocabulary synthesized
    python benchmarks/bench_grammar.py --tokenizer-151k DIR  # a real GLM-4.5 tokenizer.json for the 151k rows

1. The bundled model answers random JSON schemas (`tests/data/random_schemas.json`), thinking off and on,
   constrained. Its answers are then replayed through fresh constraints, timing exactly what the engine adds per
   generated token — `restrict` (the next token's bitmask), applying it to a row of logits, `accept` — and
   compared with the time of one unconstrained decode step (one sequence, greedy, the captured CPU step).
2. The same JSON answers, tokenized by each vocabulary, walked by xgrammar and by llguidance: mask and accept per
   token. The 151,552-token vocabulary is GLM-4.5's when `--tokenizer-151k` is given; otherwise it is the bundled
   model's 3,072 tokens plus concatenations of pairs of them (a byte-level vocabulary of realistic pieces).
One thread, medians over rounds; the machine is shared, so run it when nothing else does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from glm45 import LLM, SamplingParams
from glm45.chat import plan_chat
from glm45.grammar import masks

SCHEMAS = Path(__file__).resolve().parents[1] / "tests" / "data" / "random_schemas.json"
QUESTION = [{"role": "user", "content": "Describe the weather in Paris as JSON."}]


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def decode_step_ms(llm: LLM, rounds: int = 5) -> float:
    prompt = plan_chat(QUESTION).prompt
    params = SamplingParams(max_tokens=256, temperature=0, ignore_eos=True)
    llm.generate([prompt], params, use_tqdm=False)  # warm-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        times.append((time.perf_counter() - start) / len(out.token_ids))
    return median_ms(times)


def constrained_answers(llm: LLM, schemas: list[dict], thinking: bool) -> list[tuple[object, list[int], list[int]]]:
    """[(spec, prompt ids, output ids)] of constrained greedy answers."""
    plan = plan_chat(QUESTION, default_template_kwargs={"enable_thinking": thinking})
    specs = [plan.structured_outputs(json=s) for s in schemas]
    params = [SamplingParams(max_tokens=160, temperature=0, structured_outputs=spec) for spec in specs]
    outputs = llm.generate([plan.prompt] * len(specs), params, use_tqdm=False)
    return [(spec, o.prompt_token_ids, o.outputs[0].token_ids) for spec, o in zip(specs, outputs, strict=True)]


def replay_ms(llm: LLM, answers, rounds: int = 3) -> tuple[float, int]:
    """Median time per token of what constrained decoding adds to a step (restrict + apply + accept)."""
    backend = llm.engine.grammar
    vocab = llm.engine.model_config.vocab_size
    logits = torch.randn(1, vocab)
    per_round = []
    for _ in range(rounds):
        total, tokens = 0.0, 0
        for spec, prompt_ids, output_ids in answers:
            constraint = backend.constraint(spec, prompt_ids, max_tokens=160)
            bitmask = masks.allocate(1, vocab)
            for token in output_ids:
                row = logits.clone()
                start = time.perf_counter()
                restriction = constraint.restrict(bitmask, 0)
                if restriction is not None and restriction.masked:
                    masks.apply(row, bitmask)
                constraint.accept(token)
                total += time.perf_counter() - start
                tokens += 1
        per_round.append(total / tokens)
    return median_ms(per_round), tokens


def synthetic_vocab(base: list[bytes], size: int) -> list[bytes]:
    pieces = [b for b in base if b and b.strip() and len(b) > 1]
    vocab, seen, i = list(base), set(base), 0
    while len(vocab) < size:
        a, b = pieces[i % len(pieces)], pieces[(i * 7919 + 13) % len(pieces)]
        i += 1
        if a + b not in seen:
            seen.add(a + b)
            vocab.append(a + b)
    return vocab


def greedy_tokenize(text: bytes, index: dict[bytes, int], longest: int) -> list[int]:
    ids, at = [], 0
    while at < len(text):
        for length in range(min(longest, len(text) - at), 0, -1):
            token = index.get(text[at:at + length])
            if token is not None:
                ids.append(token)
                at += length
                break
        else:
            raise ValueError(f"no token for byte {text[at]}")
    return ids


def engines_ms(vocab: list[bytes], stops: list[int], docs: list[tuple[dict, bytes]],
               tokenizer_json: str | None = None) -> dict[str, tuple[float, float, float]]:
    """{engine: (mask µs, accept µs)} per token, walking each JSON document with its schema's grammar. llguidance
    reads `tokenizer_json` when there is one (its fast path), else the vocabulary through its Python wrapper."""
    import xgrammar as xgr

    try:
        import llguidance
        import llguidance.torch as llgt
    except ImportError:  # only this comparison needs it: pip install llguidance
        llguidance = None

    index = {b: i for i, b in enumerate(vocab) if b}
    longest = max(map(len, index))
    walks = [(schema, greedy_tokenize(doc, index, longest) + [stops[0]]) for schema, doc in docs]
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=len(vocab), stop_token_ids=stops)
    compiler = xgr.GrammarCompiler(info, max_threads=1)

    class Vocab:  # what llguidance's TokenizerWrapper reads
        eos_token_id, bos_token_id, tokens, special_token_ids = stops[0], None, vocab, [
            i for i, b in enumerate(vocab) if not b]

        def __call__(self, text):
            return greedy_tokenize(text if isinstance(text, bytes) else text.encode(), index, longest)

    if llguidance is None:
        lltok = None
    elif tokenizer_json is not None:
        lltok = llguidance.LLTokenizer(tokenizer_json, n_vocab=len(vocab), eos_token=stops[0])
    else:
        lltok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Vocab()))
    out = {}
    for name in ("xgrammar", "llguidance") if lltok is not None else ("xgrammar",):
        mask_t, accept_t, setup_t, n = 0.0, 0.0, 0.0, 0
        bitmask = masks.allocate(1, len(vocab))
        for schema, ids in walks:
            start = time.perf_counter()
            if name == "xgrammar":
                matcher = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(schema), any_whitespace=False))
                fill, accept = (lambda m=matcher, b=bitmask: m.fill_next_token_bitmask(b, 0)), matcher.accept_token
            else:
                grammar = llguidance.LLMatcher.grammar_from_json_schema(
                    schema, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
                matcher = llguidance.LLMatcher(lltok, grammar)
                fill, accept = (lambda m=matcher, b=bitmask: llgt.fill_next_token_bitmask(m, b, 0)), \
                    matcher.consume_token
            setup_t += time.perf_counter() - start
            for token in ids:
                start = time.perf_counter()
                fill()
                middle = time.perf_counter()
                ok = accept(token)
                accept_t += time.perf_counter() - middle
                mask_t += middle - start
                n += 1
                if not ok:
                    break
        out[name] = (mask_t / n * 1e6, accept_t / n * 1e6, setup_t / len(walks) * 1e3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemas", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokenizer-151k", default=None, help="a folder with GLM-4.5's tokenizer.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    schemas = json.loads(SCHEMAS.read_text())[: args.schemas]
    llm = LLM()
    step = decode_step_ms(llm)
    print(f"bundled model, one sequence, greedy decode step: {step * 1e3:.0f} µs ({1e3 / step:.0f} tokens/s)")
    docs = []
    for thinking in (False, True):
        answers = constrained_answers(llm, schemas, thinking)
        cost, tokens = replay_ms(llm, answers)
        print(f"thinking {'on ' if thinking else 'off'}: grammar per token {cost * 1e3:.1f} µs over {tokens} tokens "
              f"= {cost / step:.1%} of a decode step")
        if not thinking:
            docs = [(s, llm.tokenizer.decode(ids).strip().encode()) for s, (_, _, ids) in zip(schemas, answers,
                                                                                          strict=True)]
    base = llm.tokenizer.vocab_bytes
    stops = llm.tokenizer.eos_token_ids
    bundled_json = (llm.engine.model_path / "tokenizer.json").read_text()
    vocabs = {"3,072 (bundled)": (base, stops, bundled_json)}
    if args.tokenizer_151k:
        from glm45.tokenizer import Tokenizer

        big = Tokenizer.from_pretrained(args.tokenizer_151k)
        big_json = (Path(args.tokenizer_151k) / "tokenizer.json").read_text()
        vocabs["151,552 (GLM-4.5)"] = (big.vocab_bytes, big.eos_token_ids, big_json)
    else:
        vocabs["151,552 (synthetic)"] = (synthetic_vocab(base, 151552), stops, None)
    print("JSON answers walked token by token: mask µs + accept µs per token; compile (xgrammar) or matcher setup "
          "(llguidance) ms per schema")
    for name, (vocab, stop_ids, tokenizer_json) in vocabs.items():
        results = engines_ms(vocab, stop_ids, docs, tokenizer_json)
        print(f"  {name:22s} " + "   ".join(f"{engine}: {m:.1f} + {a:.1f} µs, {c:.1f} ms"
                                            for engine, (m, a, c) in results.items()))


if __name__ == "__main__":
    main()
