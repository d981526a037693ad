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

from glm45.engine.sampler import apply_penalties, draw, probabilities


def target_distributions(logits: torch.Tensor, seq, drafts: list[int]) -> list[torch.Tensor]:
    """The distribution plain decoding would sample from at each verify position (penalties see the
    drafts before that position as already generated)."""
    prompt = seq.token_ids[: seq.num_prompt_tokens]
    out = []
    for i in range(len(drafts) + 1):
        penalised = apply_penalties(logits[i], seq.params, prompt, seq.output_token_ids + drafts[:i])
        out.append(probabilities(penalised, seq.params))
    return out


def greedy_verify(logits: torch.Tensor, seq, drafts: list[int]) -> list[int]:
    if seq.params.uses_penalties:
        prompt = seq.token_ids[: seq.num_prompt_tokens]
        targets = [int(apply_penalties(logits[i], seq.params, prompt, seq.output_token_ids + drafts[:i]).argmax())
                   for i in range(len(drafts) + 1)]
    else:  # one argmax over all positions
        targets = logits[: len(drafts) + 1].argmax(-1).tolist()
    accepted: list[int] = []
    for i, token in enumerate(targets):
        accepted.append(token)
        if i == len(drafts) or token != drafts[i]:
            break
    return accepted


def rejection_sample(
    target_probs: list[torch.Tensor], draft_probs: torch.Tensor, drafts: list[int], generator: torch.Generator | None
) -> list[int]:
    """target_probs: k+1 rows p_0…p_k; draft_probs [k, V] rows q_1…q_k that drafts were sampled from."""
    accepted: list[int] = []
    for i, token in enumerate(drafts):
        p, q = target_probs[i], draft_probs[i]
        u = float(torch.rand((), generator=generator, device=p.device))
        if u * float(q[token]) <= float(p[token]):
            accepted.append(token)
            continue
        residual = (p - q).clamp(min=0.0)
        total = residual.sum()
        accepted.append(draw(residual / total if total > 0 else p, generator))
        return accepted
    accepted.append(draw(target_probs[len(drafts)], generator))
    return accepted


def verify(logits: torch.Tensor, seq) -> list[int]:
    """logits [k+1, V] of the target at the verify positions → the tokens to append (1 … k+1)."""
    drafts = seq.draft_token_ids
    if seq.params.greedy:
        return greedy_verify(logits, seq, drafts)
    return rejection_sample(target_distributions(logits, seq, drafts), seq.draft_probs, drafts, seq.generator)


def choose_draft(logits: torch.Tensor, seq) -> tuple[int, torch.Tensor | None]:
    """A draft token from the MTP logits: argmax for greedy requests, else a sample from q (returned)."""
    if seq.params.greedy:
        return int(logits.argmax()), None
    q = probabilities(logits, seq.params)
    return draw(q, seq.generator), q


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
