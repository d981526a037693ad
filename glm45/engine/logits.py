"""What changes the logits before a token is chosen: a request's `logit_bias`, and its constraint's mask.

The executor calls these on copies of the rows it samples from, wherever a token is chosen:
- `process_rows`: one row per sequence, each masked by its sequence's current constraint state (plain decode);
- `process_chain`: the k+1 rows of one sequence's MTP verification, row i masked by the state after the first i
  drafts (advanced on a fork of the constraint, thrown away after), so that a draft the grammar refuses has
  probability 0 and is rejected, and the token chosen in its place obeys the grammar;
- drafting uses `process_rows` with per-sequence forks that follow the drafts chosen so far.
The bias is added first, then the mask sets refused tokens to -inf. Log-probabilities stay those of the model's
own logits (the executor reports them from the unprocessed rows).
"""

from __future__ import annotations

import numpy as np
import torch

from glm45.grammar import masks


def needs_processing(seq) -> bool:
    return bool(seq.params.logit_bias) or seq.constraint is not None


def _bias(row: torch.Tensor, seq) -> None:
    bias = seq.params.logit_bias
    if bias:
        ids = torch.tensor(list(bias), dtype=torch.long, device=row.device)
        row.index_add_(-1, ids, torch.tensor(list(bias.values()), dtype=row.dtype, device=row.device))


def _restrict(row: torch.Tensor, state, bitmask: torch.Tensor, index: int):
    """Mask one row by `state`; returns the restriction (None: nothing was restricted)."""
    restriction = state.restrict(bitmask, index)
    if restriction is None:
        return None
    if restriction.masked:
        masks.apply(row.unsqueeze(0), bitmask[index:index + 1])
    elif restriction.banned:
        row[list(restriction.banned)] = float("-inf")
    return restriction


def mask_for(state, bitmask: torch.Tensor, index: int):
    """Row `index` of `bitmask` set to exactly what `state` allows next, a banned-token restriction written as
    cleared bits too (for a kernel that takes only bitmasks); returns the restriction, None when nothing is
    restricted."""
    bitmask[index] = -1
    restriction = state.restrict(bitmask, index)
    if restriction is not None and not restriction.masked:
        words = bitmask[index].numpy().view(np.uint32)
        for token in restriction.banned:
            words[token // 32] &= ~np.uint32(1 << (token % 32))
    return restriction


def allows(restriction, bitmask: torch.Tensor, index: int, token: int) -> bool:
    if restriction is None:
        return True
    if restriction.masked:
        return bool((int(bitmask[index, token // 32]) >> (token % 32)) & 1)
    return token not in restriction.banned


def process_rows(logits: torch.Tensor, seqs: list, states: list | None = None) -> torch.Tensor:
    """logits [rows, V] (modified in place), row i of `seqs[i]`, masked by `states[i]` (default: its constraint)."""
    states = states if states is not None else [seq.constraint for seq in seqs]
    bitmask = None
    for i, (seq, state) in enumerate(zip(seqs, states, strict=True)):
        _bias(logits[i], seq)
        if state is not None:
            bitmask = bitmask if bitmask is not None else masks.allocate(len(seqs), logits.shape[-1])
            _restrict(logits[i], state, bitmask, i)
    return logits


def mask_row(row: torch.Tensor, state) -> torch.Tensor:
    """One row of logits (modified in place) masked by a constraint state, for callers outside the engine."""
    _restrict(row, state, masks.allocate(1, row.shape[-1]), 0)
    return row


def process_chain(logits: torch.Tensor, seq, drafts: list[int]) -> torch.Tensor:
    """The k+1 verify rows of one sequence (modified in place): row i as decoding would see it after drafts[:i]."""
    for i in range(logits.shape[0]):
        _bias(logits[i], seq)
    state = seq.constraint
    if state is None:
        return logits
    bitmask = masks.allocate(logits.shape[0], logits.shape[-1])
    for i in range(logits.shape[0]):
        restriction = _restrict(logits[i], state, bitmask, i)
        if i == len(drafts) or not allows(restriction, bitmask, i, drafts[i]):
            break  # a refused draft is rejected at row i, so the rows after it are never read
        state = state.fork() if state is seq.constraint else state
        state.accept(drafts[i])
    return logits


def follow(state, seq, token: int):
    """The state after a draft token (a fork of the sequence's constraint, so the constraint itself stays put)."""
    if state is None:
        return None
    state = state.fork() if state is seq.constraint else state
    state.accept(token)
    return state


def state_after(seq, tokens: list[int]):
    """The sequence's constraint state after `tokens` not yet appended (a fork; the constraint itself when none)."""
    state = seq.constraint
    for token in tokens:
        state = follow(state, seq, token)
    return state
