"""`/v1/completions`: raw prompts (text or token ids, one or several) → the engine → text, or an SSE stream.

No chat template and no parsing: the text is what the model wrote. Several prompts run as concurrent
engine requests; choice `k * n + i` is completion `i` of prompt `k`, as in the OpenAI API.

`echo` puts the prompt before the completion, and with `logprobs` the logprobs object covers the prompt's
tokens (the first has no log-probability: `null`) then the generated ones. `max_tokens: 0` with `echo` scores
the prompt only — what lm-evaluation-harness and other log-likelihood evaluators send. A stream sends the echo
(and its log-probabilities) as each choice's first chunk, once the prompt's prefill has ended.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator

from fastapi import Request
from starlette.responses import JSONResponse, Response

from glm45.engine.sequence import CompletionOutput, RequestOutput
from glm45.server.async_engine import RequestStream
from glm45.server.limits import check_sequences
from glm45.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
    random_id,
)
from glm45.server.serving import OpenAIServing, RequestError, SSEResponse, error_event, sse, sum_usage, usage_of

logger = logging.getLogger(__name__)



class OpenAIServingCompletion(OpenAIServing):
    async def _prompts(self, request: CompletionRequest, max_tokens: int | None) -> list[list[int]]:
        """Each prompt's token ids (text tokenized in a worker thread), checked against the context length."""
        prompt = request.prompt
        if isinstance(prompt, str):
            prompts: list = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise RequestError("prompt is empty", param="prompt")
        check_sequences(len(prompts), request.n)
        out = []
        for p in prompts:
            if isinstance(p, str):
                p = await self.prompt_ids(p, max_tokens, "prompt")
            if not p:
                raise RequestError("prompt is empty", param="prompt")
            self.check_context(len(p), max_tokens, "prompt")
            out.append(list(p))
        return out

    async def create_completion(self, request: CompletionRequest, raw: Request) -> Response:
        arrival = time.monotonic()
        model = self.check_model(request.model)
        self._ignore_extras(request)
        if request.suffix:
            raise RequestError("suffix is not supported", param="suffix")
        if request.best_of is not None and request.best_of != request.n:
            raise RequestError("best_of must equal n (best-of ranking is not supported)", param="best_of")
        if request.max_tokens == 0 and not request.echo:
            raise RequestError("max_tokens=0 returns nothing without echo=true (which then scores the prompt only)",
                               param="max_tokens")
        if request.echo:
            self._need_tokenizer()
        # max_tokens=0 runs as 1 (prefill always samples) and drops that token, as vLLM does. Echo with logprobs
        # needs the prompt's log-probabilities: `prompt_logprobs` alternatives when given, else `logprobs` (vLLM).
        max_tokens = 1 if request.max_tokens == 0 else request.max_tokens
        prompt_k = request.prompt_logprobs
        if prompt_k is None and request.echo:
            prompt_k = request.logprobs
        params = self.sampling_params(request, max_tokens, request.logprobs, prompt_k)
        prompts = await self._prompts(request, max_tokens)
        request_id = random_id("cmpl")
        streams: list[RequestStream] = []
        try:
            for k, ids in enumerate(prompts):
                streams.append(await self.submit(f"{request_id}-{k}", ids, params, arrival, model))
        except BaseException:
            for k in range(len(streams)):
                self.engine.abort(f"{request_id}-{k}")
            raise
        # The prompt as written, special tokens included, so that the logprobs' text offsets fall in it.
        echo = [self.tokenizer.decode(ids, skip_special_tokens=False) if request.echo else "" for ids in prompts]
        if request.stream:
            return SSEResponse(self._completion_stream(request_id, model, streams, echo, request))
        finals = []
        try:
            for k, stream in enumerate(streams):
                finals.append(await self.final_output(f"{request_id}-{k}", stream, raw))
        finally:
            for k in range(len(finals) + 1, len(streams)):
                if not streams[k].finished:
                    self.engine.abort(f"{request_id}-{k}")
        choices = [self._choice(k * request.n + completion.index, final, completion, echo[k], request)
                   for k, final in enumerate(finals) for completion in final.outputs]
        usage = sum_usage([self._usage(final, request) for final in finals])
        return JSONResponse(CompletionResponse(id=request_id, model=model, choices=choices, usage=usage)
                            .model_dump(mode="json"))

    def _choice(self, index: int, final: RequestOutput, completion: CompletionOutput, echo: str,
                request: CompletionRequest) -> CompletionChoice:
        """One finished choice: the echoed prompt, then the completion (none with max_tokens=0), and their
        log-probabilities in that order."""
        score_only = request.max_tokens == 0
        logprobs = None
        if request.logprobs is not None:
            entries = self._echo_entries(final) if request.echo else []
            entries += [] if score_only else _generated_entries(completion.logprobs)
            logprobs = self._completion_logprobs(entries, request.logprobs, 0)[0]
        prompt_logprobs = self.prompt_logprobs(final, request.prompt_logprobs)
        return CompletionChoice(index=index, text=echo + ("" if score_only else completion.text),
                                finish_reason="length" if score_only else completion.finish_reason,
                                stop_reason=None if score_only else completion.stop_reason,
                                logprobs=logprobs, prompt_logprobs=prompt_logprobs)

    @staticmethod
    def _usage(final: RequestOutput, request: CompletionRequest, completion_tokens: int | None = None) -> Usage:
        usage = usage_of(final, completion_tokens)
        if request.max_tokens == 0:  # the token sampled after the prompt was dropped
            usage = usage.model_copy(update={"completion_tokens": 0, "total_tokens": usage.prompt_tokens})
        return usage

    def _echo_entries(self, output: RequestOutput) -> list[tuple[int, dict[int, float] | None]]:
        """(token id, log-probabilities) of every prompt token; the first has none."""
        if output.prompt_logprobs is None:  # aborted before its prefill ended
            return [(token_id, None) for token_id in output.prompt_token_ids]
        return list(zip(output.prompt_token_ids, output.prompt_logprobs, strict=True))

    async def _completion_stream(self, request_id: str, model: str, streams: list[RequestStream], echo: list[str],
                                 request: CompletionRequest) -> AsyncIterator[str]:
        created = int(time.time())
        n, k_top, score_only = request.n, request.logprobs, request.max_tokens == 0
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        started: set[tuple[int, int]] = set()
        done: set[tuple[int, int]] = set()
        held: dict[tuple[int, int], tuple[str, list]] = {}  # deltas that came while the echo waited
        offsets: dict[tuple[int, int], int] = {}  # text_offset of the choice's next token, as in the whole response
        finals: dict[int, RequestOutput] = {}
        completion_tokens: dict[int, int] = {}

        def chunk(index: int, text: str, finish_reason: str | None = None, logprobs=None) -> str:
            choice = CompletionChoice(index=index, text=text, finish_reason=finish_reason, logprobs=logprobs)
            return sse(CompletionResponse(id=request_id, created=created, model=model, choices=[choice]))

        try:
            async for k, output in _merged(streams):  # deltas: each output carries what is new
                finals[k] = output
                for completion in output.outputs:
                    key, index = (k, completion.index), k * n + completion.index
                    completion_tokens[k] = completion_tokens.get(k, 0) + len(completion.token_ids)
                    text, entries = completion.text, _generated_entries(completion.logprobs)
                    if key not in started:
                        earlier_text, earlier_entries = held.pop(key, ("", []))
                        text, entries = earlier_text + text, earlier_entries + entries
                        if request.echo and k_top is not None and output.prompt_logprobs is None \
                                and completion.finish_reason is None:
                            held[key] = (text, entries)
                            continue  # the echo waits for the prompt's log-probabilities (chunked prefill)
                        started.add(key)
                        offsets[key] = 0
                        if request.echo:
                            logprobs = None
                            if k_top is not None:
                                logprobs, offsets[key] = self._completion_logprobs(self._echo_entries(output), k_top, 0)
                            yield chunk(index, echo[k], logprobs=logprobs)
                    if key in done:
                        continue
                    if score_only:
                        if completion.finish_reason is not None:
                            yield chunk(index, "", "length")
                            done.add(key)
                        continue
                    logprobs = None
                    if completion.logprobs is not None:
                        logprobs, offsets[key] = self._completion_logprobs(entries, k_top, offsets[key])
                    if text or (logprobs and logprobs.tokens) or completion.finish_reason:
                        yield chunk(index, text, completion.finish_reason, logprobs)
                    if completion.finish_reason is not None:
                        done.add(key)
            if include_usage:
                usage = sum_usage([self._usage(final, request, completion_tokens[k]) for k, final in finals.items()])
                yield sse(CompletionResponse(id=request_id, created=created, model=model, choices=[], usage=usage))
        except Exception as e:  # the stream has started: end it with an error event, never a cut connection
            yield error_event(request_id, e)
        finally:
            for k, stream in enumerate(streams):
                if not stream.finished:
                    self.engine.abort(f"{request_id}-{k}")
        yield sse("[DONE]")

    def _completion_logprobs(self, entries: list[tuple[int, dict[int, float] | None]], k: int,
                             offset: int) -> tuple[CompletionLogprobs, int]:
        """OpenAI's logprobs object for (token id, log-probabilities) pairs, and the text offset after them.
        `top_logprobs` holds the token and the top k (k + 1 entries at most, as vLLM writes them); `text_offset`
        counts the characters of the tokens before, from `offset`."""
        out = CompletionLogprobs()
        for token_id, entry in entries:
            text = self._token_logprob(token_id, 0.0).token
            out.tokens.append(text)
            out.text_offset.append(offset)
            offset += len(text)
            if entry is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(max(entry[token_id], -9999.0))
            out.top_logprobs.append({self._token_logprob(t, lp).token: max(lp, -9999.0)
                                     for t, lp in itertools.islice(entry.items(), k + 1)})
        return out, offset


def _generated_entries(logprobs: list[dict[int, float]] | None) -> list[tuple[int, dict[int, float]]]:
    """(token id, log-probabilities) of generated tokens: each entry holds its sampled token first."""
    return [(next(iter(entry)), entry) for entry in logprobs or []]


async def _merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as they come, tagged with the stream's position."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue(maxsize=len(streams))  # bounded: a slow reader holds the pumps back

    async def pump(k: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                await queue.put((k, output, None))
        except Exception as e:
            await queue.put((k, None, e))

    tasks = [asyncio.ensure_future(pump(k, s)) for k, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            k, output, error = await queue.get()
            if error is not None:
                raise error
            yield k, output
            remaining -= output.finished
    finally:
        for task in tasks:
            task.cancel()
