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

import torch

from glm45.engine.sampler import argmax_rows, column, distributions, draw_rows, penalise, uniforms


def choose_drafts(logits: torch.Tensor, seqs: list) -> tuple[list[int], list[torch.Tensor | None]]:
    """One draft token per row of the MTP logits: argmax for greedy requests, else a draw from q, which is
    returned with it (the verification needs it)."""
    tokens = argmax_rows(logits)
    q: list[torch.Tensor | None] = [None] * len(seqs)
    sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if sampled:
        index = column(sampled, torch.long, logits.device)
        probs = distributions(logits.index_select(0, index), [seqs[i].params for i in sampled])
        u = uniforms([seqs[i].generator for i in sampled], 1, logits.device)[:, 0]
        for j, (i, token) in enumerate(zip(sampled, draw_rows(probs, u).tolist(), strict=True)):
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
        zero = p.new_zeros(1, p.shape[-1])
        q = torch.cat([t for b in sampled for t in (seqs[b].draft_probs.to(p.dtype), zero)])
        d = column([t for b in sampled for t in (*seqs[b].draft_token_ids, 0)], torch.long, device)[:, None]
        u = torch.cat([uniforms([seqs[b].generator], 2 * (spans[b][1] + 1), device).view(-1, 2) for b in sampled])
        # accept d_i with probability min(1, p(d_i) / q(d_i)); else draw from norm(max(0, p − q)); the last row of
        # each sequence has q = 0, so its draw is the bonus token from p
        accept = (u[:, 0:1] * q.gather(1, d) <= p.gather(1, d))[:, 0]
        residual = (p - q).clamp_(min=0.0)
        has_mass = residual.sum(-1, keepdim=True) > 0
        drawn = draw_rows(torch.where(has_mass, residual, p), u[:, 1])
        accept, drawn = accept.tolist(), drawn.tolist()
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
