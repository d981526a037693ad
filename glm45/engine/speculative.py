"""MTP speculative decoding: the checkpoint's MTP layer drafts k tokens, the target model checks them.

Drafting (after each step, for every sequence whose next token is known):
    pairs (h_t, x_{t+1}) for the positions the target just computed → MTP KV for those positions, and
    from the last pair the first draft d_1; then k-1 more MTP steps, each on (h', d_{j-1}) where h' is the
    *normalised* MTP output of the previous step (see glm45/model/mtp.py).
Verification (in the next step): the target runs [x_n, d_1 … d_k] in one forward, giving its
distribution at each of the k+1 positions.
- greedy requests accept d_i while it equals the target's argmax, then take the target's own token;
- sampled requests use rejection sampling: accept d_i with probability min(1, p(d_i) / q(d_i)); at the
  first rejection draw from norm(max(0, p − q)); if all are accepted draw a bonus token from p. The
  emitted tokens are then distributed exactly as plain sampling from p (Leviathan et al., 2023).
"""

from __future__ import annotations

import numpy as np
import torch

from glm45.engine.sampler import (
    argmax_rows,
    column,
    distributions,
    draw_rows,
    host_uniforms,
    on_host,
    penalise,
    uniforms,
)
from glm45.kernels import cpu


def choose_drafts(logits: torch.Tensor, seqs: list, drawn_with: list[float] | None = None
                  ) -> tuple[list[int], list[torch.Tensor | None]]:
    """One draft token per row of the MTP logits: argmax for greedy requests, else a draw from q, which is
    returned with it (the verification needs it). The sampled rows' uniforms come from their sequences' streams,
    or are `drawn_with` (one per sampled row, already taken from them)."""
    tokens = argmax_rows(logits)
    q: list[torch.Tensor | None] = [None] * len(seqs)
    sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if sampled:
        index = column(sampled, torch.long, logits.device)
        probs = distributions(logits if len(sampled) == len(seqs) else logits.index_select(0, index),
                              [seqs[i].params for i in sampled])
        generators = [seqs[i].generator for i in sampled]
        if on_host(probs):  # the same uniforms and draw, without the tensor round trips
            drawn = cpu.draw(probs, drawn_with if drawn_with is not None else host_uniforms(generators))
        else:
            u = uniforms(generators, 1, logits.device)[:, 0] if drawn_with is None else \
                torch.tensor(drawn_with, dtype=torch.float32, device=logits.device)
            drawn = draw_rows(probs, u).tolist()
        for j, (i, token) in enumerate(zip(sampled, drawn, strict=True)):
            tokens[i] = token
            q[i] = probs[j]
    return tokens, q


def verify(chunks: list[torch.Tensor], seqs: list) -> list[list[int]]:
    """For each sequence its target logits at the k+1 verify positions ([k+1, V], after bias and masks) → the
    tokens to append (1 … k+1), all sequences in one batch of tensor operations.

    Penalties see the drafts before a position as already generated. Each sampled sequence takes 2(k+1)
    uniforms from its stream per step (an acceptance test and a draw per position), whatever is accepted."""
    params, prompts, outputs, spans = [], [], [], []
    for seq in seqs:
        drafts = seq.draft_token_ids
        spans.append((len(params), len(drafts)))
        prompt = seq.token_ids[: seq.num_prompt_tokens] if seq.params.uses_penalties else []
        for i in range(len(drafts) + 1):
            params.append(seq.params)
            prompts.append(prompt)
            outputs.append(seq.output_token_ids + drafts[:i] if seq.params.uses_penalties else [])
    logits = penalise(chunks[0] if len(chunks) == 1 else torch.cat(chunks), params, prompts, outputs)
    device = logits.device
    targets = argmax_rows(logits)
    sampled = [b for b, seq in enumerate(seqs) if not seq.params.greedy]
    accept = drawn = None
    if sampled:
        rows = [spans[b][0] + i for b in sampled for i in range(spans[b][1] + 1)]
        p = distributions(logits.index_select(0, column(rows, torch.long, device)), [params[r] for r in rows])
        accept, drawn = (_reject_on_host if on_host(p) else _reject)(p, [seqs[b] for b in sampled])
    results, at = [], 0
    for seq, (start, k) in zip(seqs, spans, strict=True):
        drafts, emitted = seq.draft_token_ids, []
        if seq.params.greedy:
            for i in range(k + 1):
                emitted.append(targets[start + i])
                if i == k or targets[start + i] != drafts[i]:
                    break
        else:
            for i in range(k + 1):
                if i < k and accept[at + i]:
                    emitted.append(drafts[i])
                    continue
                emitted.append(drawn[at + i])
                break
            at += k + 1
        results.append(emitted)
    return results


def _reject(p: torch.Tensor, seqs: list) -> tuple[list[bool], list[int]]:
    """Rejection sampling as batched tensor operations. p: the target distributions at each sequence's k + 1 rows,
    one sequence after another → per row whether its draft is accepted and the token drawn there."""
    zero = p.new_zeros(1, p.shape[-1])
    q = torch.cat([t for seq in seqs for t in (seq.draft_probs.to(p.dtype), zero)])
    d = column([t for seq in seqs for t in (*seq.draft_token_ids, 0)], torch.long, p.device)[:, None]
    u = torch.cat([uniforms([seq.generator], 2 * (len(seq.draft_token_ids) + 1), p.device).view(-1, 2)
                   for seq in seqs])
    # accept d_i with probability min(1, p(d_i) / q(d_i)); else draw from norm(max(0, p − q)); the last row of
    # each sequence has q = 0, so its draw is the bonus token from p
    accept = (u[:, 0:1] * q.gather(1, d) <= p.gather(1, d))[:, 0]
    residual = (p - q).clamp_(min=0.0)
    has_mass = residual.sum(-1, keepdim=True) > 0
    drawn = draw_rows(torch.where(has_mass, residual, p), u[:, 1])
    return accept.tolist(), drawn.tolist()


def _reject_on_host(p: torch.Tensor, seqs: list) -> tuple[list[bool], list[int]]:
    """`_reject` row by row on CPU arrays, with the same uniforms and float32 arithmetic, so the same tokens; rows
    after a sequence's first rejection are not drawn (their tokens are never read)."""
    p = p.numpy()
    accept, drawn, at = [], [], 0
    for seq in seqs:
        k = len(seq.draft_token_ids)
        u = torch.rand(2 * (k + 1), generator=seq.generator).numpy()
        q = seq.draft_probs.float().numpy()
        for i in range(k + 1):
            row = p[at + i]
            if i < k:
                d = seq.draft_token_ids[i]
                accept.append(bool(u[2 * i] * q[i, d] <= row[d]))
                if accept[-1]:
                    drawn.append(-1)
                    continue
                residual = np.maximum(row - q[i], 0.0)
                row = residual if residual.sum() > 0 else row
            else:
                accept.append(True)
            drawn.append(cpu.draw(torch.from_numpy(row)[None], [float(u[2 * i + 1])])[0])
            drawn.extend([-1] * (k - i))
            accept.extend([False] * (k - i))
            break
        at += k + 1
    return accept, drawn


class AcceptanceStats:
    """Per draft position: how many drafts were checked and how many accepted."""

    def __init__(self, k: int):
        self.proposed = [0] * k
        self.accepted = [0] * k
        self.steps = 0          # verification steps
        self.emitted = 0        # tokens emitted by them (accepted drafts + one target token each)

    def record(self, num_drafts: int, num_emitted: int) -> None:
        num_accepted = num_emitted - 1
        for i in range(num_drafts):
            self.proposed[i] += 1
            self.accepted[i] += int(i < num_accepted)
        self.steps += 1
        self.emitted += num_emitted

    @property
    def acceptance_rates(self) -> list[float]:
        return [a / p if p else 0.0 for a, p in zip(self.accepted, self.proposed, strict=True)]

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verification step (1 means no draft was ever accepted)."""
        return self.emitted / self.steps if self.steps else 0.0
