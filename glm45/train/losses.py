"""The training losses: next-token cross-entropy and the MTP (multi-token prediction) loss.

With labels[t] = x_{t+1} (or -100 where no loss is taken), the MTP layer sees the pair (h_t, x_{t+1}) at
position t — h_t the main model's final normalised hidden state — and predicts x_{t+2} = labels[t+1].
The MTP loss is the masked mean cross-entropy of those predictions; its gradient also reaches the main
model through h_t, as in DeepSeek-V3 and GLM-4.5, so that trained checkpoints have a working draft head.

Most positions of a chat (system prompt, tool list, user turns, tool results) take no loss, so the output
heads — the largest matmuls of a small model — are applied only at the positions that do
(`masked_cross_entropy`): the MTP loss takes the model's one MTP forward (`mtp_hidden_states`, which returns
h' without logits) and applies the head at the trained positions only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labels that are not -100 (0 when there are none)."""
    if not (labels != -100).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


def masked_cross_entropy(head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """cross_entropy(head(hidden), labels), with the head applied only where labels are not -100 (on no row when
    there are none: the head is still called, as FSDP needs every rank to call the same modules)."""
    keep = labels != -100
    logits = head(hidden[keep])
    if not keep.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels[keep])


def mtp_hidden(model, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The MTP layer's normalised output h' for the pairs (h_t, x_{t+1}), t = 0..T−2."""
    positions = torch.arange(input_ids.shape[1] - 1, device=input_ids.device)
    return model.mtp_hidden_states(input_ids[:, 1:], hidden[:, :-1], positions)


def mtp_loss(model, hidden: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Masked cross-entropy of the MTP predictions of x_{t+2} (labels[:, 1:])."""
    if model.mtp is None:
        raise ValueError("the model has no MTP layer; use --mtp-weight 0")
    if input_ids.shape[1] < 3:
        return hidden.sum() * 0.0
    return masked_cross_entropy(model.mtp.shared_head.head, mtp_hidden(model, hidden, input_ids), labels[:, 1:])
