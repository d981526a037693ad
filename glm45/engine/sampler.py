"""Turning logits into tokens, for a batch of rows that each follow their own request's parameters.

`probabilities` applies, in vLLM's order: repetition/presence/frequency penalties, temperature, top-k,
top-p, min-p, softmax. Greedy rows take the argmax of the penalised logits. Sampled rows draw with their
own request's `torch.Generator` through the exponential race (argmax p / E, E ~ Exp(1)), which samples
exactly from p and consumes the request's random stream only — so a seeded request gives the same
output whatever else is in the batch. Log-probabilities are reported from the raw model distribution (in
float32), those of sampled tokens row by row and those of prompt tokens many rows at a time.
"""

from __future__ import annotations

import torch

from glm45.engine.sampling_params import SamplingParams


def apply_penalties(
    logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int], output_ids: list[int]
) -> torch.Tensor:
    """One row. Repetition penalty over prompt and output (HF/vLLM: divide positive, multiply negative
    logits); presence and frequency penalties over the output only (OpenAI)."""
    if not params.uses_penalties:
        return logits
    logits = logits.clone()
    vocab = logits.shape[-1]
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long, device=logits.device)
        seen = seen[seen < vocab]
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if output_ids and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(output_ids, device=logits.device), minlength=vocab)[:vocab]
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)
    return logits


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One row of (already penalised) logits → the distribution a sampled request draws from."""
    logits = logits.float() / max(params.temperature, 1e-5)
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # drop a token when the tokens strictly before it already reach top_p
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), float("-inf"))
    probs = logits.softmax(-1)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
        probs = probs / probs.sum()
    return probs


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return int(torch.argmax(probs / noise))


def top_logprobs(raw_logits: torch.Tensor, token_id: int, k: int) -> dict[int, float]:
    logprobs = raw_logits.float().log_softmax(-1)
    result = {token_id: float(logprobs[token_id])}
    if k > 0:
        values, ids = logprobs.topk(k)
        for value, index in zip(values.tolist(), ids.tolist(), strict=True):
            result.setdefault(index, value)
    return result


def rows_top_logprobs(logits: torch.Tensor, token_ids: list[int], ks: list[int]) -> list[dict[int, float]]:
    """`top_logprobs` for many rows at once (prompt log-probabilities): row i's float32 log-softmax at
    `token_ids[i]`, then its top `ks[i]`, with a constant number of tensor ops whatever the number of rows."""
    logprobs = logits.float().log_softmax(-1)
    targets = torch.tensor(token_ids, dtype=torch.long, device=logits.device)
    chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
    values, ids = logprobs.topk(max(ks, default=0), dim=-1)
    values, ids = values.tolist(), ids.tolist()
    out = []
    for token_id, logprob, k, row_values, row_ids in zip(token_ids, chosen, ks, values, ids, strict=True):
        entry = {token_id: logprob}
        for index, value in zip(row_ids[:k], row_values[:k], strict=True):
            entry.setdefault(index, value)
        out.append(entry)
    return out


class Sampler:
    """Samples one token per row; each row brings its sequence (parameters, history, generator)."""

    def __call__(self, logits: torch.Tensor, seqs: list,
                 raw_logits: torch.Tensor | None = None) -> list[tuple[int, dict[int, float] | None]]:
        """One token per row of `logits`; log-probabilities from `raw_logits` (the model's own, before any bias or
        mask) when given."""
        raw_logits = logits if raw_logits is None else raw_logits
        results = []
        greedy_rows = [i for i, s in enumerate(seqs) if s.params.greedy and not s.params.uses_penalties]
        greedy_ids = logits[greedy_rows].argmax(-1).tolist() if greedy_rows else []
        greedy = dict(zip(greedy_rows, greedy_ids, strict=True))
        for row, seq in enumerate(seqs):
            if row in greedy:
                token = greedy[row]
            else:
                penalised = apply_penalties(logits[row], seq.params, seq.token_ids[: seq.num_prompt_tokens],
                                            seq.output_token_ids)
                if seq.params.greedy:
                    token = int(penalised.argmax())
                else:
                    token = draw(probabilities(penalised, seq.params), seq.generator)
            logprobs = None if seq.params.logprobs is None else top_logprobs(raw_logits[row], token,
                                                                             seq.params.logprobs)
            results.append((token, logprobs))
        return results
