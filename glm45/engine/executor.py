"""The executor: runs a scheduled batch on the model and turns the logits into tokens.

`execute(batch)` covers, for each scheduled sequence, its next `num_tokens` known tokens (a prefill chunk, or
the one pending token of a decode), plus its MTP drafts when it decodes speculatively: it builds the flat
inputs, positions and slot mapping, has the model runner run the target model's cached forward, then samples
(or verifies the drafts) and returns a `StepResult`; for requests with `prompt_logprobs` it also reads the
logits at the prompt positions the chunk covered. It changes no sequence (but may grow block tables, below); the
scheduler applies the result.

When every sequence of a batch decodes plainly (one pending token, no drafts, and nothing asked of its logits but a
token: no penalty, bias, log-probabilities, constraint or adapter) and the runner runs several decode steps in one
call (the captured CPU step, `num_scheduler_steps`), the step is such a run (`step_runs.py` chooses its length and
allocates its blocks), and it returns up to that many tokens per sequence; the scheduler drops those past a stop.
Likewise for MTP's one-program steps, whose host side is `draft_step.py`.
`propose_drafts()` then runs the MTP layer over the pairs that step computed and returns k draft tokens for
every sequence that decodes next. Tokens and drafts are chosen after the request's `logit_bias` and its
constraint's mask (`logits.py`).

Where a constrained call's name starts (`ScheduledSeq.name_choices`), the step first scores each declared name
after the sequence's pending token — one forward per name, its K/V written past the known tokens and overwritten
by the next — and picks one (`name_choice.py`); the batch's forward then computes the chosen name's tokens as
known ones after the pending token, and the token after the name is sampled from its last row.

The executor sits above the model runner (as in vLLM): with tensor parallelism the runner is rank 0's
`DistributedModelRunner`, which sends each call's plain inputs to the other ranks first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from glm45.engine.attention import SeqSlice, StepInputs
from glm45.engine.block_manager import BlockManager
from glm45.engine.draft_step import Drafted, DraftSteps
from glm45.engine.logits import follow, needs_processing, process_chain, process_rows, state_after
from glm45.engine.model_runner import ModelRunner
from glm45.engine.name_choice import choose_name, name_logprobs, until_name_start
from glm45.engine.sampler import Sampler, host_row, host_uniforms, rows_top_logprobs
from glm45.engine.scheduler import ScheduledSeq, SeqResult, StepResult
from glm45.engine.sequence import Sequence
from glm45.engine.speculative import AcceptanceStats, choose_drafts, verify
from glm45.engine.step_runs import RunPlanner

PROMPT_LOGPROBS_BYTES = 64 << 20  # float32 logits of prompt rows reduced at a time (~110 rows of GLM-4.5's vocab)


def select_rows(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """logits[rows]: a view when the rows are consecutive (a decode step's usual case), else a copy. At 64 rows of a
    151k vocabulary a copy is 39 MB of fresh pages, about 14 ms on the 2-core machine."""
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return logits[rows[0]:rows[0] + len(rows)]
    return logits[rows]


@dataclass
class _Computed:
    """Where one sequence's tokens sat in the last forward, for drafting from its hidden states."""

    seq: Sequence
    start: int      # its first position in the forward
    num_valid: int  # positions whose K/V (and hidden state) stays valid: known tokens and accepted drafts
    q_start: int    # its first row in the forward


class Executor:
    def __init__(self, runner: ModelRunner, block_manager: BlockManager, num_speculative_tokens: int = 0,
                 max_model_len: int | None = None):
        self.runner = runner
        self.max_model_len = max_model_len
        self.block_manager = block_manager
        self.k = num_speculative_tokens if runner.has_mtp else 0
        self.sampler = Sampler()
        self.stats = AcceptanceStats(max(self.k, 1))
        self._computed: list[_Computed] = []
        self._drafted: list[Drafted] = []  # the one-program MTP step's next drafts
        self.runs = RunPlanner(runner, block_manager, max_model_len)
        self.draft_steps = DraftSteps(runner, block_manager, self.runs, self.stats, self.k, max_model_len)

    def reset(self) -> None:
        """Forget the last step (it failed): nothing to draft from."""
        self._computed = []
        self._drafted = []
        self.draft_steps.next_masks = {}

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSeq]) -> StepResult:
        self._drafted = []
        start = time.perf_counter()
        if self.draft_steps.applies(batch):
            steps = self.runs.draft_steps(batch)
            result, self._drafted = self.draft_steps.run(batch, steps) if steps > 1 else self.draft_steps.step(batch)
            self._computed = []
        else:
            steps = self.runs.decode_steps(batch) if not self.k else 1
            result = self._execute_decode_steps(batch, steps) if steps > 1 else self._execute_step(batch)
        self.runs.record(batch, time.perf_counter() - start, steps)
        return result

    def _execute_step(self, batch: list[ScheduledSeq]) -> StepResult:
        names = {item.seq.seq_id: self._choose_name(item) for item in batch if item.name_choices is not None}
        ids, positions, slots, slices, adapters = [], [], [], [], []
        plan = []  # (seq, start, num_tokens, drafts, q_start, name): `name` the chosen name's tokens, or []
        for item in batch:
            seq, start = item.seq, item.seq.num_computed_tokens
            ends_known = start + item.num_tokens == len(seq)
            name = names.get(seq.seq_id, [])
            drafts = list(seq.draft_token_ids) if ends_known and item.num_tokens == 1 and not name else []
            tokens = seq.token_ids[start:start + item.num_tokens] + name + drafts
            plan.append((seq, start, item.num_tokens, drafts, len(ids), name))
            slices.append(SeqSlice(len(ids), len(tokens), start + len(tokens), seq.block_table, seq.seq_id))
            ids += tokens
            positions += range(start, start + len(tokens))
            slots += self.block_manager.slots(seq, start, len(tokens))
            adapters += [seq.lora_slot] * len(tokens)

        # Logits only where something is sampled: the last known token, and every draft position (and a chosen
        # name's positions, for the log-probabilities of its tokens).
        logit_rows, owners = [], []
        for seq, start, num_tokens, drafts, q_start, name in plan:
            if start + num_tokens == len(seq):
                owners.append((seq, len(logit_rows), len(drafts), name))
                logit_rows += range(q_start + num_tokens - 1, q_start + num_tokens + len(name) + len(drafts))
        adapter_ids = adapters if any(a >= 0 for a in adapters) else None
        logits = self.runner.forward(StepInputs(ids, positions, slots, slices, adapter_ids), logit_rows)
        new_tokens = self._sample(logits, owners)
        prompt_logprobs = self._prompt_logprobs(plan)

        results, self._computed = {}, []
        for seq, start, num_tokens, drafts, q_start, name in plan:
            tokens, logprobs = new_tokens.get(seq.seq_id, ([], []))
            # K/V stays valid for the known tokens, a chosen name's, and each accepted draft's.
            num_valid = num_tokens + max(0, len(tokens) - 1) if drafts else num_tokens + len(name)
            results[seq.seq_id] = SeqResult(tokens, logprobs, start + num_valid, len(drafts),
                                            prompt_logprobs.get(seq.seq_id, []))
            self._computed.append(_Computed(seq, start, num_valid, q_start))
        return StepResult(results)

    def _execute_decode_steps(self, batch: list[ScheduledSeq], steps: int) -> StepResult:
        """Up to `steps` decode steps in one call of the runner (it ends once every sequence has stopped): each
        sequence's token from each step run, all but the last computed (their K/V written). A sampled sequence draws
        one uniform per step from its stream, as a step of its own would (those of steps not run are never used)."""
        ids, positions, slots, slices, sampled = [], [], [], [], {}
        vocab = self.runner.model.config.vocab_size
        for row, item in enumerate(batch):
            seq = item.seq
            start = seq.num_computed_tokens
            ids.append(seq.token_ids[start])
            positions.append(start)
            slots.append(self.block_manager.slot(seq, start))
            slices.append(SeqSlice(row, 1, start + 1, seq.block_table, seq.seq_id))
            if not seq.params.greedy:
                sampled[row] = (host_row(seq.params, vocab), host_uniforms([seq.generator] * steps))
        tokens = self.runner.decode_steps(StepInputs(ids, positions, slots, slices), steps, sampled,
                                          [self.runs.until(item.seq) for item in batch])
        self._computed = []
        return StepResult({item.seq.seq_id: SeqResult(row, [None] * len(row), item.seq.num_computed_tokens + len(row))
                           for item, row in zip(batch, tokens, strict=True)})

    def _prompt_logprobs(self, plan: list) -> dict[int, list[dict[int, float]]]:
        """{seq_id: log-probabilities of the prompt tokens its chunk predicts} for sequences that asked for them.

        The row of position p predicts prompt token p + 1. The rows' logits come from the runner a block at a time
        (`PROMPT_LOGPROBS_BYTES` of float32 logits), each reduced to its entries before the next: a long prompt
        never holds more than one block of [rows, vocab] logits."""
        rows, owners, targets, ks = [], [], [], []
        for seq, start, num_tokens, _, q_start, _ in plan:
            for p in seq.prompt_logprob_positions(start, num_tokens):
                rows.append(q_start + p - start)
                owners.append(seq.seq_id)
                targets.append(seq.token_ids[p + 1])
                ks.append(seq.params.prompt_logprobs)
        out: dict[int, list[dict[int, float]]] = {}
        block = max(1, PROMPT_LOGPROBS_BYTES // (4 * self.runner.model.config.vocab_size))
        for i in range(0, len(rows), block):
            entries = rows_top_logprobs(self.runner.logits(rows[i:i + block]), targets[i:i + block], ks[i:i + block])
            for seq_id, entry in zip(owners[i:i + block], entries, strict=True):
                out.setdefault(seq_id, []).append(entry)
        return out

    def _sample(self, logits: torch.Tensor | None, owners: list) -> dict[int, tuple[list[int], list]]:
        """{seq_id: (new tokens, their logprobs)} for the sequences that sample this step. Tokens are chosen from
        the logits after `logit_bias` and constraint masks (`logits.py`); log-probabilities are the model's own."""
        new_tokens: dict[int, tuple[list[int], list]] = {}
        plain = [(seq, row, name) for seq, row, num_drafts, name in owners if num_drafts == 0]
        if plain:
            raw = select_rows(logits, [row + len(name) for _, row, name in plain])
            seqs = [seq for seq, _, _ in plain]
            # After a chosen name the constraint stands past it: a fork of it, advanced through the name, masks.
            states = [state_after(seq, name) for seq, _, name in plain]
            chosen = process_rows(raw.clone(), seqs, states) if any(map(needs_processing, seqs)) else raw
            sampled = self.sampler(chosen, seqs, raw_logits=raw, pending=[name for _, _, name in plain])
            for (seq, row, name), (token, logprobs) in zip(plain, sampled, strict=True):
                named = rows_top_logprobs(logits[row:row + len(name)], name, [seq.params.logprobs] * len(name)) \
                    if name and seq.params.logprobs is not None else [None] * len(name)
                new_tokens[seq.seq_id] = (name + [token], named + [logprobs])
        drafted = [(seq, row, num_drafts) for seq, row, num_drafts, _ in owners if num_drafts]
        if drafted:
            chunks = []
            for seq, row, num_drafts in drafted:
                rows = logits[row:row + num_drafts + 1]
                chunks.append(process_chain(rows.clone(), seq, seq.draft_token_ids) if needs_processing(seq) else rows)
            accepted = [until_name_start(seq, tokens)
                        for (seq, _, _), tokens in zip(drafted, verify(chunks, [seq for seq, _, _ in drafted]),
                                                       strict=True)]
            wanted = [(seq, row + i, t) for (seq, row, _), tokens in zip(drafted, accepted, strict=True)
                      if seq.params.logprobs is not None for i, t in enumerate(tokens)]
            entries = iter(rows_top_logprobs(logits[[r for _, r, _ in wanted]], [t for _, _, t in wanted],
                                             [seq.params.logprobs for seq, _, _ in wanted]) if wanted else [])
            for (seq, _, num_drafts), tokens in zip(drafted, accepted, strict=True):
                self.stats.record(num_drafts, len(tokens))
                new_tokens[seq.seq_id] = (tokens, [None if seq.params.logprobs is None else next(entries)
                                                   for _ in tokens])
        return new_tokens

    def _choose_name(self, item: ScheduledSeq) -> list[int]:
        """Score each declared name after the sequence's pending token (one forward of the pending token and the
        name per name) and return the chosen one's tokens."""
        seq, start = item.seq, item.seq.num_computed_tokens
        scores = []
        for name in item.name_choices:
            tokens = [seq.token_ids[start], *name]
            n = len(tokens)
            inputs = StepInputs(tokens, list(range(start, start + n)), self.block_manager.slots(seq, start, n),
                                [SeqSlice(0, n, start + n, seq.block_table, seq.seq_id)],
                                [seq.lora_slot] * n if seq.lora_slot >= 0 else None)
            scores.append(name_logprobs(self.runner.forward(inputs, list(range(len(name)))), name))
        return item.name_choices[choose_name(scores, seq.params, seq.generator)]

    def propose_drafts(self) -> list[tuple[Sequence, list[int], torch.Tensor | None]]:
        """MTP over the pairs (h_t, x_{t+1}) the last step computed (their MTP K/V), then k draft tokens for each
        sequence that decodes next: [(seq, drafts, draft distributions or None for greedy)]."""
        # A sequence that finished in the step (its blocks not yet freed) still gets its MTP K/V when the prefix cache
        # is on: without it, its blocks could not be shared, and the same prompt again would be computed whole.
        keep = self.block_manager.enable_prefix_caching
        items = [c for c in self._computed if keep or not c.seq.is_finished] if self.k else []
        drafted = [entry for entry in self._drafted if keep or not entry[0].is_finished]
        self._computed, self._drafted = [], []
        for seq, valid, _, _ in drafted:  # the one-program step ran the MTP layer already
            self.block_manager.register_computed_blocks(seq, valid)
        if drafted:
            return [(seq, [draft], probs) for seq, _, draft, probs in drafted if not seq.is_finished]
        # A sequence that finished partway through its tokens has pairs only up to its last token.
        items = [c if not c.seq.is_finished else _Computed(c.seq, c.start, min(c.num_valid, len(c.seq) - 1 - c.start),
                                                           c.q_start) for c in items]
        items = [c for c in items if c.num_valid > 0]
        if not items:
            return []
        ids, positions, slots, slices, rows = [], [], [], [], []
        for c in items:
            slices.append(SeqSlice(len(ids), c.num_valid, c.start + c.num_valid, c.seq.block_table, c.seq.seq_id))
            ids += c.seq.token_ids[c.start + 1:c.start + c.num_valid + 1]
            positions += range(c.start, c.start + c.num_valid)
            slots += self.block_manager.slots(c.seq, c.start, c.num_valid)
            rows += range(c.q_start, c.q_start + c.num_valid)
        # Every pair gets its MTP K/V; logits only at the last pair of sequences that decode next step.
        decoding = [i for i, c in enumerate(items) if not c.seq.in_prefill and not c.seq.is_finished]
        last_rows = [slices[i].q_start + slices[i].q_len - 1 for i in decoding]
        logits = self.runner.draft(StepInputs(ids, positions, slots, slices), rows, last_rows)
        for c in items:  # their blocks' MTP K/V is complete up to here: the prefix cache may share them now
            self.block_manager.register_computed_blocks(c.seq, c.start + c.num_valid)
        seqs = [items[i].seq for i in decoding]
        drafts: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor | None]] = [[] for _ in seqs]
        # Drafts obey the same bias and constraint as the tokens they stand for (each on a fork of the constraint
        # that follows the drafts chosen so far), so that the grammar does not reject them at verification.
        processed = any(map(needs_processing, seqs))
        states = [seq.constraint for seq in seqs]
        for step in range(self.k if seqs else 0):
            if processed:
                logits = process_rows(logits.clone(), seqs, states)
            tokens, q = choose_drafts(logits, seqs)
            for b, seq in enumerate(seqs):
                drafts[b].append(tokens[b])
                probs[b].append(q[b])
                if processed and step < self.k - 1:
                    states[b] = follow(states[b], seq, tokens[b])
            if step == self.k - 1:
                break
            # The pair (h', d_j) sits at position n + j - 1, where n is the pending token's position.
            pos = [len(seq) - 1 + step for seq in seqs]
            pairs = list(zip(seqs, pos, strict=True))
            step_slices = [SeqSlice(b, 1, p + 1, seq.block_table, seq.seq_id) for b, (seq, p) in enumerate(pairs)]
            step_slots = [self.block_manager.slot(seq, p) for seq, p in pairs]
            tokens = [d[-1] for d in drafts]
            logits = self.runner.draft(StepInputs(tokens, pos, step_slots, step_slices), None, list(range(len(seqs))))
        return [(seq, d, None if seq.params.greedy else torch.stack(q))
                for seq, d, q in zip(seqs, drafts, probs, strict=True)]
