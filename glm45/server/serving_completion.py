"""`/v1/completions`: raw prompts (text or token ids, one or several) → the engine → text, or an SSE stream.

No chat template and no parsing: the text is what the model wrote. Several prompts run as concurrent
engine requests; choice `k * n + i` is completion `i` of prompt `k`, as in the OpenAI API.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import Request
from starlette.responses import JSONResponse, Response

from glm45.engine.sequence import RequestOutput
from glm45.server.async_engine import EngineError, RequestStream
from glm45.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    random_id,
)
from glm45.server.serving import OpenAIServing, RequestError, SSEResponse, sse, sum_usage, usage_of

logger = logging.getLogger(__name__)



class OpenAIServingCompletion(OpenAIServing):
    def _prompts(self, request: CompletionRequest) -> list[list[int]]:
        prompt = request.prompt
        if isinstance(prompt, str):
            prompts: list = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise RequestError("prompt is empty", param="prompt")
        out = []
        for p in prompts:
            if isinstance(p, str):
                self._need_tokenizer()
                p = self.tokenizer.encode(p)
            if not p:
                raise RequestError("prompt is empty", param="prompt")
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
        if request.echo and request.logprobs is not None:
            raise RequestError("echo with logprobs is not supported (no prompt log-probabilities)", param="echo")
        if request.echo:
            self._need_tokenizer()
        prompts = self._prompts(request)
        params = self.sampling_params(request, request.max_tokens, request.logprobs)
        for ids in prompts:
            self.check_context(len(ids), request.max_tokens, "prompt")
        request_id = random_id("cmpl")
        streams: list[RequestStream] = []
        try:
            for k, ids in enumerate(prompts):
                streams.append(await self.submit(f"{request_id}-{k}", ids, params, arrival))
        except BaseException:
            for k in range(len(streams)):
                self.engine.abort(f"{request_id}-{k}")
            raise
        echo = [self.tokenizer.decode(ids) if request.echo else "" for ids in prompts]
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return SSEResponse(self._completion_stream(request_id, model, streams, echo, request.n, include_usage))
        finals = []
        try:
            for k, stream in enumerate(streams):
                finals.append(await self.final_output(f"{request_id}-{k}", stream, raw))
        finally:
            for k in range(len(finals) + 1, len(streams)):
                if not streams[k].finished:
                    self.engine.abort(f"{request_id}-{k}")
        choices = []
        for k, final in enumerate(finals):
            for completion in final.outputs:
                choices.append(CompletionChoice(
                    index=k * request.n + completion.index, text=echo[k] + completion.text,
                    finish_reason=completion.finish_reason, stop_reason=completion.stop_reason,
                    logprobs=self._completion_logprobs(completion.logprobs, 0)))
        usage = sum_usage([usage_of(final) for final in finals])
        return JSONResponse(CompletionResponse(id=request_id, model=model, choices=choices, usage=usage)
                            .model_dump(mode="json"))

    async def _completion_stream(self, request_id: str, model: str, streams: list[RequestStream], echo: list[str],
                                 n: int, include_usage: bool) -> AsyncIterator[str]:
        created = int(time.time())
        sent: dict[tuple[int, int], int] = {}
        logprobs_sent: dict[tuple[int, int], int] = {}
        finals: dict[int, RequestOutput] = {}

        def chunk(index: int, text: str, finish_reason: str | None = None, logprobs=None) -> str:
            choice = CompletionChoice(index=index, text=text, finish_reason=finish_reason, logprobs=logprobs)
            return sse(CompletionResponse(id=request_id, created=created, model=model, choices=[choice]))

        try:
            async for k, output in _merged(streams):
                finals[k] = output
                for completion in output.outputs:
                    key = (k, completion.index)
                    if key not in sent:
                        sent[key], logprobs_sent[key] = 0, 0
                        if echo[k]:
                            yield chunk(k * n + completion.index, echo[k])
                    if sent[key] < 0:
                        continue
                    text = completion.text[sent[key]:]
                    sent[key] = len(completion.text)
                    logprobs = None
                    if completion.logprobs is not None:
                        logprobs = self._completion_logprobs(completion.logprobs[logprobs_sent[key]:], 0)
                        logprobs_sent[key] = len(completion.logprobs)
                    if text or (logprobs and logprobs.tokens) or completion.finish_reason:
                        yield chunk(k * n + completion.index, text, completion.finish_reason, logprobs)
                    if completion.finish_reason is not None:
                        sent[key] = -1
            if include_usage:
                usage = sum_usage([usage_of(final) for final in finals.values()])
                yield sse(CompletionResponse(id=request_id, created=created, model=model, choices=[], usage=usage))
        except EngineError as e:
            logger.error("request %s failed: %s", request_id, e)
            yield sse(json.dumps(RequestError(str(e), status=500, type="server_error").to_json()))
        finally:
            for k, stream in enumerate(streams):
                if not stream.finished:
                    self.engine.abort(f"{request_id}-{k}")
        yield sse("[DONE]")

    def _completion_logprobs(self, entries: list[dict[int, float]] | None, offset: int) -> CompletionLogprobs | None:
        if entries is None:
            return None
        out = CompletionLogprobs()
        for entry in entries:
            token_id, logprob = next(iter(entry.items()))
            text = self._token_logprob(token_id, logprob).token
            out.tokens.append(text)
            out.token_logprobs.append(max(logprob, -9999.0))
            out.top_logprobs.append({self._token_logprob(t, lp).token: max(lp, -9999.0) for t, lp in entry.items()})
            out.text_offset.append(offset)
            offset += len(text)
        return out


async def _merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as they come, tagged with the stream's position."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(k: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                queue.put_nowait((k, output, None))
        except Exception as e:
            queue.put_nowait((k, None, e))

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
