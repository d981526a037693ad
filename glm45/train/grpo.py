"""GRPO's arithmetic: group-normalised advantages, per-token log-probabilities and the clipped policy-ratio loss.

GRPO (DeepSeekMath, Shao et al. 2024) samples G completions o_1…o_G of each prompt, scores them r_1…r_G and gives
every token of o_i the advantage of its completion within the group:

    A_i = (r_i − mean(r)) / (std(r) + 1e-4)          (`scale_rewards="group"`; "none": r_i − mean(r), Dr. GRPO)

(std with Bessel's correction, as TRL computes it). Per completion token t, with the ratio
ρ_t = π_θ(o_t|·) / π_old(o_t|·) and the per-token KL estimate to a frozen reference (Schulman's k3, ≥ 0, unbiased):

    ℓ_t = −min(ρ_t·A_i, clip(ρ_t, 1 − ε, 1 + ε)·A_i) + β·(exp(q_t − p_t) − (q_t − p_t) − 1)

where p_t = log π_θ(o_t|·) and q_t = log π_ref(o_t|·). `loss_type="grpo"` averages ℓ over each completion's tokens,
then over the completions; `loss_type="dapo"` averages over all completion tokens of the step at once (DAPO's token-
level mean, TRL's default), so long completions are not down-weighted per token. π_old is the policy that sampled
the completions: with one update per batch of rollouts (`num_iterations=1`) it is π_θ itself at the time of the
update, ρ = 1 in value, and the gradient is −A·∇log π_θ (+ β·∇KL).

Log-probabilities are taken at the sampling temperature (logits / T), the distribution the engine drew from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "dapo")
SCALE_REWARDS = ("group", "none")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """rewards [N·G] in groups of G consecutive completions → advantages [N·G]."""
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}, got {scale!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size).double()
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
        centred = centred / (std + 1e-4)
    return centred.view(-1).float()


def token_logprobs(model, input_ids: torch.Tensor, completion_mask: torch.Tensor,
                   temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(x_{t+1} | x_≤t) at temperature T for the tokens where `completion_mask` [B, L] is set (one row per
    completion, right-padded) → (logprobs [K] of the K masked tokens in row-major order, the trunk's final hidden
    states [B, L, D]). The head runs only at the positions that predict a completion token."""
    hidden = model.hidden_states(input_ids)
    predicts = completion_mask[:, 1:]                       # position t predicts token t+1
    logits = model.compute_logits(hidden[:, :-1][predicts]).float() / temperature
    targets = input_ids[:, 1:][predicts]
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1), hidden


@dataclass
class PolicyLoss:
    """The loss of one micro-batch (already divided by the step's normaliser) and its statistics (sums)."""

    loss: torch.Tensor
    kl_sum: float
    clipped_tokens: int
    tokens: int


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                ref_logprobs: torch.Tensor | None, lengths: list[int], epsilon: float, beta: float,
                loss_type: str, normaliser: float) -> PolicyLoss:
    """GRPO's loss over one micro-batch of completions.

    logprobs, old_logprobs, ref_logprobs: [K] per completion token, completions one after another with `lengths`;
    advantages: [len(lengths)] one per completion. `normaliser`: the step's completion tokens ("dapo") or
    completions ("grpo") over all micro-batches, so that the micro-batch losses add up to the step's loss."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    lengths_t = torch.tensor(lengths, device=logprobs.device)
    token_advantages = advantages.to(logprobs.device).repeat_interleave(lengths_t)
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * token_advantages
    clipped = ratio.clamp(1 - epsilon, 1 + epsilon) * token_advantages
    per_token = -torch.minimum(unclipped, clipped)
    kl_sum = 0.0
    if ref_logprobs is not None:
        log_ratio = ref_logprobs - logprobs
        kl = torch.exp(log_ratio) - log_ratio - 1
        kl_sum = float(kl.detach().sum())
        if beta:
            per_token = per_token + beta * kl
    if loss_type == "dapo":
        total = per_token.sum()
    else:
        sequence = torch.zeros(len(lengths), device=per_token.device, dtype=per_token.dtype)
        owner = torch.arange(len(lengths), device=per_token.device).repeat_interleave(lengths_t)
        total = (sequence.index_add(0, owner, per_token) / lengths_t.clamp(min=1)).sum()
    clipped_tokens = int(((ratio < 1 - epsilon) | (ratio > 1 + epsilon)).sum())
    return PolicyLoss(total / normaliser, kl_sum, clipped_tokens, int(logprobs.numel()))


def mtp_self_distillation(model, hidden: torch.Tensor, input_ids: torch.Tensor,
                          completion_mask: torch.Tensor) -> torch.Tensor:
    """The MTP layer's cross-entropy on the sampled completions, with the trunk's hidden states detached: the head
    learns to follow the policy (so speculative decoding keeps its acceptance) without steering it."""
    from glm45.train.losses import masked_cross_entropy, mtp_hidden

    labels = torch.full_like(input_ids, -100)  # labels[t] = x_{t+1} where that is a completion token
    labels[:, :-1] = torch.where(completion_mask[:, 1:], input_ids[:, 1:], labels[:, :-1])
    # No early return when nothing is labelled: under FSDP every rank must run the same modules.
    h = mtp_hidden(model, hidden.detach(), input_ids)
    return masked_cross_entropy(model.mtp.shared_head.head, h, labels[:, 1:])
