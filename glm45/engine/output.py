"""Output processing, the last part of an engine step: new tokens → text, stop strings, `RequestOutput`s.

Each sequence has an incremental detokenizer (bytes of a character split across tokens are held back until the
character is whole); a final-only request without stop strings is decoded once, when it finishes. Stop strings are
matched on the new text only: a stop string can only end inside what was just added, so for each new end position
the processor looks up the suffixes of the few lengths the stop strings have in a set — O(new characters × distinct
stop lengths) per step, however long the list. A sequence that hits one is cut right after the token that completed
the match (text cut before the stop string, or after it with `include_stop_str_in_output`) and reported as stopped,
for the scheduler to free.

Outputs are cumulative (all text and tokens so far) or, with `RequestOutputKind.DELTA`, only what is new since
the request's previous output, so that a server streaming a long answer copies each token once, not once per
step; with `RequestOutputKind.FINAL_ONLY` a request has one output, when it finishes. The prompt's token ids are
copied once per request and shared by its outputs (read-only).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from glm45.engine.sampling_params import RequestOutputKind
from glm45.engine.sequence import CompletionOutput, RequestOutput, Sequence


@dataclass
class _StopStrings:
    strings: frozenset[str]
    lengths: tuple[int, ...]  # the distinct lengths, longest first: at one end position the longest match wins
    longest: int

    @classmethod
    def of(cls, stops: list[str]) -> _StopStrings | None:
        if not stops:
            return None
        lengths = tuple(sorted({len(s) for s in stops}, reverse=True))
        return cls(frozenset(stops), lengths, lengths[0])

    def first_match(self, text: str, new_from: int) -> tuple[int, str] | None:
        """(end position, stop string) of the earliest match ending after `new_from`, else None."""
        for end in range(max(new_from + 1, 1), len(text) + 1):
            for length in self.lengths:
                if length <= end and text[end - length:end] in self.strings:
                    return end, text[end - length:end]
        return None


@dataclass
class _SeqText:
    detokenizer: object | None
    stops: _StopStrings | None
    text: str = ""
    num_fed: int = 0  # output tokens given to the detokenizer so far
    # Delta outputs: how much text, how many tokens and logprobs earlier outputs carried.
    text_sent: int = 0
    tokens_sent: int = 0


@dataclass
class _Request:
    prompt: str | None
    seqs: list[Sequence]
    prompt_token_ids: list[int]
    delta: bool
    final_only: bool = False
    texts: dict[int, _SeqText] = field(default_factory=dict)


class OutputProcessor:
    def __init__(self, tokenizer=None, speculative: bool = False):
        self.tokenizer = tokenizer
        self.speculative = speculative  # report draft/accepted token counts per request
        self.requests: dict[str, _Request] = {}

    def add_request(self, request_id: str, prompt: str | None, seqs: list[Sequence]) -> None:
        kind = seqs[0].params.output_kind
        request = _Request(prompt, seqs, seqs[0].prompt_token_ids, kind == RequestOutputKind.DELTA,
                           kind == RequestOutputKind.FINAL_ONLY)
        for seq in seqs:
            detokenizer = None
            if self.tokenizer is not None:
                from glm45.tokenizer import IncrementalDetokenizer

                detokenizer = IncrementalDetokenizer(self.tokenizer, seq.params.skip_special_tokens)
            request.texts[seq.seq_id] = _SeqText(detokenizer, _StopStrings.of(seq.params.stop))
        self.requests[request_id] = request

    def remove_request(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def process(self, seqs: list[Sequence]) -> tuple[list[RequestOutput], list[Sequence]]:
        """Detokenize what `seqs` gained this step and check their stop strings. Returns the outputs of the
        requests they belong to (finished requests are forgotten) and the sequences that a stop string
        finished."""
        stopped = []
        touched: dict[str, None] = {}
        for seq in seqs:
            request = self.requests.get(seq.request_id)
            if request is None:
                continue
            touched[seq.request_id] = None
            if self._detokenize(seq, request.texts[seq.seq_id], request.final_only):
                stopped.append(seq)
        outputs = []
        for request_id in touched:
            request = self.requests[request_id]
            if request.final_only and not all(seq.is_finished for seq in request.seqs):
                continue
            output = self.output(request_id)
            if output.finished:
                del self.requests[request_id]
            outputs.append(output)
        return outputs, stopped

    def _detokenize(self, seq: Sequence, state: _SeqText, final_only: bool) -> bool:
        """Feed the sequence's new output tokens; True when a stop string finished it. Text that nothing reads
        before the sequence finishes (a final-only request without stop strings) is decoded once, at the end: the
        detokenizer's deltas join to exactly that decode."""
        tokens = seq.output_token_ids
        end = len(tokens)
        if seq.finish_reason == "stop" and isinstance(seq.stop_reason, int):
            end -= 1  # the stop token itself is not part of the text
        if state.detokenizer is not None and final_only and state.stops is None:
            if seq.is_finished and state.num_fed <= end:
                state.text = state.detokenizer.decode_all(tokens[:end])
                state.num_fed = end + 1
            return False
        if state.detokenizer is not None:
            for i in range(state.num_fed, end):
                delta = state.detokenizer.feed(tokens[i])
                state.num_fed = i + 1
                if not delta:
                    continue
                before = len(state.text)
                state.text += delta
                if state.stops is not None and (match := state.stops.first_match(state.text, before)):
                    self._stop_at(seq, state, *match)
                    return True
            if seq.is_finished and state.num_fed == end:
                state.text += state.detokenizer.finish()  # bytes held back for an incomplete character
                state.num_fed = end + 1  # flushed once
        return False

    @staticmethod
    def _stop_at(seq: Sequence, state: _SeqText, end: int, stop: str) -> None:
        keep = end if seq.params.include_stop_str_in_output else end - len(stop)
        state.text = state.text[:keep]
        # Tokens after the one completing the match (a step that took several: MTP, a run of steps) go, and with them
        # whatever finish one of them made (an end token, max_tokens).
        cut = len(seq.token_ids) > seq.num_prompt_tokens + state.num_fed
        del seq.token_ids[seq.num_prompt_tokens + state.num_fed:]
        if seq.logprobs is not None:
            del seq.logprobs[state.num_fed:]
        seq.finish("stop", stop, replace=cut)

    def output(self, request_id: str) -> RequestOutput:
        request = self.requests[request_id]
        first = request.seqs[0]
        spec = {}
        if self.speculative:
            spec = {"spec_draft_tokens": sum(seq.num_draft_tokens for seq in request.seqs),
                    "spec_accepted_tokens": sum(seq.num_accepted_tokens for seq in request.seqs)}
        # Prompt log-probabilities are reported once all of them are known (chunked prefill fills them in parts).
        complete = first.num_prompt_logprobs_done == first.num_prompt_tokens
        prompt_logprobs = first.prompt_logprobs if complete else None
        return RequestOutput(
            request_id=request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=[self._completion(seq, request.texts[seq.seq_id], request.delta) for seq in request.seqs],
            finished=all(seq.is_finished for seq in request.seqs),
            num_cached_tokens=first.num_cached_tokens,
            metrics=spec,
            prompt_logprobs=prompt_logprobs,
        )

    @staticmethod
    def _completion(seq: Sequence, state: _SeqText, delta: bool) -> CompletionOutput:
        visible = len(state.text)
        if not seq.is_finished and state.stops is not None:
            # While running, hold back a tail that could be the start of a stop string.
            visible = max(0, visible - state.stops.longest + 1)
        # A stop string is found at the latest when its last character arrives, so the text cut before it
        # never reaches into what was already visible: earlier deltas stay valid.
        text_from, token_from = (state.text_sent, state.tokens_sent) if delta else (0, 0)
        tokens_end = len(seq.token_ids) - seq.num_prompt_tokens
        if delta:
            state.text_sent, state.tokens_sent = max(visible, state.text_sent), tokens_end
        return CompletionOutput(
            index=seq.index,
            text=state.text[text_from:visible],
            token_ids=seq.token_ids[seq.num_prompt_tokens + token_from:],
            finish_reason=seq.finish_reason,
            logprobs=None if seq.logprobs is None else seq.logprobs[token_from:],
            stop_reason=seq.stop_reason,
        )
