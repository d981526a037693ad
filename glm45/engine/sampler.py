"""Turning logits into tokens for a batch of rows that each follow their own request's parameters, in one pass of
batched tensor operations: no loop over rows, and on a GPU no host synchronisation until the tokens are read.

`penalise` then `distributions` apply, in vLLM's order: repetition/presence/frequency penalties, temperature,
top-k, top-p, min-p, softmax. Greedy rows take the argmax of the penalised logits. Sampled rows draw by inverse
CDF: the first token whose cumulative probability exceeds u · total, with u uniform in [0, 1) from the request's
own host-side `torch.Generator` (a fixed number of uniforms per step; the device never waits for them), so a
seeded request gives the same output whatever else is in the batch. Top-k and top-p need the largest logits in
order (`nucleus`): `torch.topk` of the largest 1,024 (on CPUs 8,192 next, when a top-p nucleus spills over) when
that covers every truncating row, one sort of the vocabulary otherwise; the cut is a prefix sum in that order, so a
row's result does not depend on its neighbours, and a truncating row draws among its kept tokens only.
Log-probabilities are reported from the raw model distribution (in float32), many rows at a time.

On CPUs the sampled rows' distributions and draws go through `csrc/sample.c` instead, and penalties touch only each
row's history (the same rules in a few passes over each row: one row of the bundled model's logits with top-p took
0.34 ms as tensors and takes 0.07 ms there, `benchmarks/bench_sampler.py`); the tensor path stays the reference the
tests hold it to, and the path for GPUs.

`apply_penalties` and `probabilities` are the row-at-a-time definitions the batched path is tested against.
"""

from __future__ import annotations

import numpy as np
import torch

from glm45.engine.sampling_params import SamplingParams
from glm45.kernels import cpu

TOPK_LIMIT = 1024  # the largest logits looked at before sorting the whole vocabulary
WAITS_FOR_CHECKS = ("cpu",)  # devices where the host may read a check (whether a nucleus fits) mid-sampling
HOST_KERNEL = True  # CPU logits sampled by csrc/sample.c (False: the tensor path, which tests compare it with)


# ---------------------------------------------------------------------- batched path
def on_host(t: torch.Tensor) -> bool:
    """Whether rows of `t` are sampled by the host kernel."""
    return HOST_KERNEL and t.device.type == "cpu" and cpu.available()


def host_row(params: SamplingParams, vocab: int, u: float = 0.0) -> tuple[float, float, float, float, int]:
    """A sampled row's parameters as the host kernel takes them (`cpu.SampleRow`'s fields): 1 / temperature (the
    factor `_scaled` multiplies by), top-p (2: none), min-p, its uniform, and top-k (0: none)."""
    return (1.0 / max(params.temperature, 1e-5), params.top_p if params.top_p < 1.0 else 2.0, params.min_p, u,
            params.top_k if 0 < params.top_k < vocab else 0)


def uniforms(generators: list[torch.Generator | None], count: int, device: torch.device) -> torch.Tensor:
    """[rows, count] uniforms in [0, 1), each row from its own stream (made on the host, copied without waiting)."""
    host = torch.stack([torch.rand(count, generator=g) for g in generators])
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def host_uniforms(generators: list[torch.Generator | None]) -> list[float]:
    """One uniform per generator, on the host: the same draws `uniforms(generators, 1, ...)` takes from the streams."""
    return [float(torch.rand(1, generator=g)) for g in generators]


def column(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Per-row parameters read on the host, as a device tensor (copied without waiting)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _padded(rows: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(map(len, rows)))
    return column([r + [pad] * (width - len(r)) for r in rows], torch.long, device)


def penalise(logits: torch.Tensor, params: list[SamplingParams], prompts: list[list[int]],
             outputs: list[list[int]]) -> torch.Tensor:
    """Row i: repetition penalty over prompt and output (HF/vLLM: divide positive, multiply negative logits),
    presence and frequency penalties over the output only (OpenAI). Rows without penalties are returned as
    they are; the others in a new tensor."""
    rows = [i for i, p in enumerate(params) if p.uses_penalties]
    if not rows:
        return logits
    if on_host(logits):
        return _penalise_on_host(logits, [(i, params[i], prompts[i], outputs[i]) for i in rows])
    device, vocab = logits.device, logits.shape[-1]
    index = column(rows, torch.long, device)
    chosen = logits.index_select(0, index).float()
    # Histories as padded id rows; the pad id `vocab` lands in a spare column that is dropped.
    seen = torch.zeros(len(rows), vocab + 1, dtype=torch.bool, device=device)
    seen.scatter_(1, _padded([prompts[i] + outputs[i] for i in rows], vocab, device).clamp(max=vocab), True)
    seen = seen[:, :vocab]
    counts = torch.zeros(len(rows), vocab + 1, dtype=torch.float32, device=device)
    out_ids = _padded([outputs[i] for i in rows], vocab, device).clamp(max=vocab)
    counts.scatter_add_(1, out_ids, torch.ones_like(out_ids, dtype=torch.float32))
    counts = counts[:, :vocab]
    repetition = column([params[i].repetition_penalty for i in rows], torch.float32, device)[:, None]
    presence = column([params[i].presence_penalty for i in rows], torch.float32, device)[:, None]
    frequency = column([params[i].frequency_penalty for i in rows], torch.float32, device)[:, None]
    repeated = torch.where(chosen > 0, chosen / repetition, chosen * repetition)
    chosen = torch.where(seen, repeated, chosen) - frequency * counts - presence * (counts > 0)
    out = logits.float().clone() if logits.dtype != torch.float32 else logits.clone()
    return out.index_copy_(0, index, chosen)


def _penalise_on_host(logits: torch.Tensor, rows: list) -> torch.Tensor:
    """`penalise` row by row on CPU arrays, touching only each row's history tokens (the tensor path builds
    vocabulary-wide masks): the same float32 operations in the same order, so the same values."""
    out = logits.float().clone() if logits.dtype != torch.float32 else logits.clone()
    array = out.numpy()
    for i, params, prompt, output in rows:
        row = array[i]
        seen = np.unique(np.asarray(prompt + output, dtype=np.int64))
        seen = seen[seen < row.shape[0]]
        values = row[seen]
        repetition = np.float32(params.repetition_penalty)
        row[seen] = np.where(values > 0, values / repetition, values * repetition)
        ids, counts = np.unique(np.asarray(output, dtype=np.int64), return_counts=True)
        keep = ids < row.shape[0]
        ids, counts = ids[keep], counts[keep].astype(np.float32)
        row[ids] = (row[ids] - np.float32(params.frequency_penalty) * counts) - np.float32(params.presence_penalty)
    return out


def _scaled(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    # times the reciprocal: a division by a [1, 1] column is turned into that anyway, so one row alone and the
    # same row in a batch round alike
    inverse = column([1.0 / max(p.temperature, 1e-5) for p in params], torch.float32, logits.device)[:, None]
    return logits.float() * inverse


def truncates(params: SamplingParams, vocab: int) -> bool:
    return 0 < params.top_k < vocab or params.top_p < 1.0


def nucleus(scaled: torch.Tensor, params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows that truncate (top-k and/or top-p), temperature applied → (token ids [rows, W] in descending order of
    probability, their weights [rows, W]: proportional to the row's distribution, 0 where dropped).

    Only the W largest logits are looked at: W is the largest top-k, or TOPK_LIMIT when a row has top-p but no
    top-k and its nucleus ends within that many tokens (on CPUs; checked on the host), else the whole sorted
    vocabulary. A top-k row's weights are its softmax over its top k; a top-p-only row's are its softmax over
    the vocabulary. Every sum is a prefix sum along the row, so W never changes a row's result."""
    rows, vocab = scaled.shape
    device = scaled.device
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    open_rows = [k == vocab for k in ks]  # top-p alone: how many tokens it keeps is not known in advance
    width = min(vocab, max([k for k in ks if k < vocab] + [TOPK_LIMIT if any(open_rows) else 0]))
    # A GPU sorts the vocabulary faster than the host could learn whether it needs to.
    whole = width > TOPK_LIMIT or width == vocab or (any(open_rows) and device.type not in WAITS_FOR_CHECKS)
    probs = scaled.softmax(-1) if any(open_rows) else None
    k = column(ks, torch.long, device)[:, None]
    top_p = column([p.top_p if p.top_p < 1.0 else float("inf") for p in params], torch.float32, device)[:, None]
    min_p = column([p.min_p for p in params], torch.float32, device)[:, None]
    is_open = column(open_rows, torch.bool, device)[:, None]

    def weigh(values, ids):
        w = values.shape[-1]
        relative = (values - values[:, :1]).exp()
        within_k = relative / relative.cumsum(-1).gather(1, k.clamp(max=w) - 1)
        weights = torch.where(is_open, probs.gather(1, ids), within_k) if probs is not None else within_k
        before = weights.cumsum(-1) - weights
        keep = (torch.arange(w, device=device) < k) & (before < top_p) & (weights >= min_p * weights[:, :1])
        return weights * keep, before

    if not whole:  # an open row's nucleus may go on past the W-th token: then 8 W, then the whole vocabulary
        for w in (width, 8 * width):
            if w >= vocab:
                break
            values, ids = scaled.topk(w, dim=-1)
            weights, before = weigh(values, ids)
            if not any(open_rows) or not bool(((before[:, -1:] < top_p) & is_open).any()):
                return ids, weights
    values, ids = scaled.sort(dim=-1, descending=True)
    return ids, weigh(values, ids)[0]


def _dense(scaled: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Rows that do not truncate → their distributions over the vocabulary, min-p applied."""
    probs = scaled.softmax(-1)
    if any(p.min_p > 0.0 for p in params):
        min_p = column([p.min_p for p in params], torch.float32, scaled.device)[:, None]
        kept = probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0.0)
        probs = torch.where(min_p > 0, kept / kept.sum(-1, keepdim=True), probs)  # others untouched, bit for bit
    return probs


def _split(params: list[SamplingParams], vocab: int) -> tuple[list[int], list[int]]:
    cut = [i for i, p in enumerate(params) if truncates(p, vocab)]
    return cut, [i for i, p in enumerate(params) if not truncates(p, vocab)]


def distributions(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Penalised logits [rows, V] → float32 distributions over the vocabulary (temperature, top-k, top-p,
    min-p): what MTP's rejection sampling compares."""
    if on_host(logits):
        vocab = logits.shape[-1]
        return cpu.sample(logits, [host_row(p, vocab) for p in params], tokens=False, probs=True)[1]
    scaled = _scaled(logits, params)
    cut, plain = _split(params, scaled.shape[-1])
    if not cut:
        return _dense(scaled, params)
    out = torch.zeros_like(scaled)
    if plain:
        index = column(plain, torch.long, scaled.device)
        out.index_copy_(0, index, _dense(scaled.index_select(0, index), [params[i] for i in plain]))
    index = column(cut, torch.long, scaled.device)
    ids, weights = nucleus(scaled.index_select(0, index), [params[i] for i in cut])
    totals = weights.cumsum(-1)[:, -1:]
    return out.index_copy_(0, index, torch.zeros_like(out[: len(cut)]).scatter_(1, ids, weights / totals))


def draw_rows(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One column per row of (unnormalised) probabilities: the first whose cumulative mass exceeds u · total."""
    if on_host(probs):
        return torch.tensor(cpu.draw(probs, u.tolist()), dtype=torch.long)
    cdf = probs.float().cumsum(-1)
    total = cdf[:, -1:]
    # strictly below the total even where u · total rounds up to it, so the column found has mass of its own
    target = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    found = torch.searchsorted(cdf, target, right=True)[:, 0]
    # a row with no mass (NaN or zeros, from a row of −inf logits) still gets a valid id, 0, as on the host
    return torch.where(total[:, 0] > 0, found, torch.zeros_like(found))


def rows_top_logprobs(logits: torch.Tensor, token_ids: list[int], ks: list[int]) -> list[dict[int, float]]:
    """Row i's float32 log-softmax at `token_ids[i]`, then its top `ks[i]`, with a constant number of tensor ops
    whatever the number of rows (sampled tokens' and prompt tokens' log-probabilities)."""
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


def histories(seqs: list, pending: list[list[int]] | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, output ids) of each sequence that uses penalties ([] for the others: nothing to build); the output
    ends with the sequence's `pending` tokens, those it takes before the sampled one (a chosen tool name)."""
    pending = pending or [[] for _ in seqs]
    prompts = [s.token_ids[: s.num_prompt_tokens] if s.params.uses_penalties else [] for s in seqs]
    outputs = [s.output_token_ids + extra if s.params.uses_penalties else []
               for s, extra in zip(seqs, pending, strict=True)]
    return prompts, outputs


def argmax_rows(logits: torch.Tensor) -> list[int]:
    """Each row's argmax, on the host. On CPUs numpy's argmax over the same memory: the same first-maximum rule (and
    NaN as the maximum) as torch's, at a fraction of its per-call cost, which a decode step pays per token."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return logits.detach().numpy().argmax(-1).tolist()
    return logits.argmax(-1).tolist()


def choose(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> torch.Tensor:
    """[rows] tokens on the device from penalised logits: argmax for greedy rows, a draw for the others (truncating
    rows draw among their nucleus only, the others over the vocabulary)."""
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    device, vocab = logits.device, logits.shape[-1]
    if sampled and on_host(logits):  # one uniform per sampled row from its stream, as below
        u = host_uniforms([generators[i] for i in sampled])
        rows = logits if len(sampled) == len(params) else logits.index_select(0, column(sampled, torch.long, device))
        drawn = cpu.sample(rows, [host_row(params[i], vocab, u_i) for i, u_i in zip(sampled, u, strict=True)])[0]
        chosen = argmax_rows(logits) if len(sampled) < len(params) else drawn
        for i, token in zip(sampled, drawn, strict=True):
            chosen[i] = token
        return torch.tensor(chosen)
    tokens = logits.argmax(-1)
    if not sampled:
        return tokens
    u = uniforms([generators[i] for i in sampled], 1, device)[:, 0]  # one per sampled row, in their order
    cut, plain = _split([params[i] for i in sampled], vocab)
    for group, truncated in ((cut, True), (plain, False)):
        if not group:
            continue
        rows = [sampled[j] for j in group]
        index = column(rows, torch.long, device)
        scaled = _scaled(logits.index_select(0, index), [params[i] for i in rows])
        u_rows = u.index_select(0, column(group, torch.long, device))
        if truncated:
            ids, weights = nucleus(scaled, [params[i] for i in rows])
            drawn = ids.gather(1, draw_rows(weights, u_rows)[:, None])[:, 0]
        else:
            drawn = draw_rows(_dense(scaled, [params[i] for i in rows]), u_rows)
        tokens = tokens.index_copy(0, index, drawn)
    return tokens


class Sampler:
    """Samples one token per row; each row brings its sequence (parameters, history, generator)."""

    def __call__(self, logits: torch.Tensor, seqs: list, raw_logits: torch.Tensor | None = None,
                 pending: list[list[int]] | None = None) -> list[tuple[int, dict[int, float] | None]]:
        """One token per row of `logits`; log-probabilities from `raw_logits` (the model's own, before any bias or
        mask) when given. `pending`: per row, tokens its sequence takes before this one (penalties count them)."""
        raw_logits = logits if raw_logits is None else raw_logits
        params = [s.params for s in seqs]
        logits = penalise(logits, params, *histories(seqs, pending))
        if all(p.greedy for p in params):
            tokens = argmax_rows(logits)
        else:
            tokens = choose(logits, params, [s.generator for s in seqs]).tolist()  # the step's one wait
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        logprobs: list[dict[int, float] | None] = [None] * len(seqs)
        if want:
            entries = rows_top_logprobs(raw_logits[want], [tokens[i] for i in want], [params[i].logprobs for i in want])
            for i, entry in zip(want, entries, strict=True):
                logprobs[i] = entry
        return list(zip(tokens, logprobs, strict=True))


# ---------------------------------------------------------------------- row-at-a-time definitions (reference)
def apply_penalties(
    logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int], output_ids: list[int]
) -> torch.Tensor:
    """One row: repetition penalty over prompt and output, presence and frequency penalties over the output."""
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
