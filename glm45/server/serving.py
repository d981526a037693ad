"""What chat and text completions share: the checks every request passes, the bridge calls, errors and SSE.

Everything the client could have got wrong is checked before the engine sees the request and before any
byte of the response is sent, so mistakes become a `RequestError` (an OpenAI error JSON with status 400
or 404) and never a broken stream. The order: model name, the bounds on work (`limits.py`), prompt (for chat:
messages and tools rendered with the GLM-4.5 template), sampling values, then the context length with the
numbers in the message. Rendering and tokenizing run in a worker thread, never on the event loop, and a text
whose length alone proves it longer than the context is refused before it is tokenized.

Once a stream has started, a failure of any kind ends it with an OpenAI-shaped `error` event and `data: [DONE]`
(`stream_errors`), never a cut connection. The endpoints themselves are in `serving_chat.py` and
`serving_completion.py`.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from starlette.responses import StreamingResponse

from glm45.engine.sampling_params import SamplingParams
from glm45.engine.sequence import RequestOutput
from glm45.server.async_engine import AsyncEngine, EngineError, OutputAccumulator, RequestStream
from glm45.server.config import ServerConfig
from glm45.server.errors import ClientDisconnected, RequestError
from glm45.server.limits import check_logit_bias, check_sampling
from glm45.server.protocol import PromptLogprob, PromptLogprobs, SamplingFields, TopLogprob, Usage

logger = logging.getLogger(__name__)

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                   "repetition_penalty")


class SSEResponse(StreamingResponse):
    """Server-sent events whose generator is always closed (and so its request aborted) when the
    response ends for any reason: finished, client gone, or server shutting down."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str]):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


def sse(payload: Any) -> str:
    text = payload if isinstance(payload, str) else payload.model_dump_json(exclude_none=True)
    return f"data: {text}\n\n"


def error_event(request_id: str, error: BaseException) -> str:
    """The SSE event that ends a stream which failed after it started (OpenAI's error shape)."""
    if isinstance(error, EngineError):
        logger.error("request %s failed: %s", request_id, error)
        failure = RequestError(str(error), status=500, type="server_error")
    else:
        logger.exception("request %s failed while streaming", request_id)
        failure = RequestError(f"internal server error: {type(error).__name__}", status=500, type="server_error")
    return sse(json.dumps(failure.to_json()))


class OpenAIServing:
    """The checks and engine calls of one endpoint family; `OpenAIServingChat`/`OpenAIServingCompletion` add
    the endpoints."""

    def __init__(self, engine: AsyncEngine, config: ServerConfig, model_names: list[str]):
        self.engine = engine
        self.config = config
        self.model_names = model_names
        self.tokenizer = engine.engine.tokenizer
        self.max_model_len = engine.engine.max_model_len
        self.chat_template = config.load_chat_template()
        self.max_token_bytes = self.tokenizer.max_token_bytes if self.tokenizer is not None else None

    @property
    def loras(self) -> dict:
        """The engine's LoRA adapters, served under their names as models of their own."""
        return {r.lora_name: r for r in self.engine.engine.list_loras()}

    # ------------------------------------------------------------------ shared checks
    def check_model(self, name: str | None) -> str:
        """The model name to answer with: the request's, when it is served (a served name with `*` or `?` is a
        pattern: `--served-model-name glm-4.5 'claude-*'` answers Claude Code's names; a LoRA adapter's name picks
        that adapter), else the first."""
        if name is not None and not model_name_served(name, self.model_names) and name not in self.loras:
            served = ", ".join([*self.model_names, *self.loras])
            raise RequestError(f"The model `{name}` does not exist. Served models: {served}",
                               status=404, param="model", code="model_not_found")
        return name or self.model_names[0]

    def _need_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise RequestError("this model has no tokenizer: only /v1/completions with token-id prompts works")

    @staticmethod
    def _ignore_extras(request: SamplingFields) -> None:
        if request.model_extra:
            names = sorted(request.model_extra)
            logger.info("ignoring unsupported request fields: %s%s", ", ".join(names[:20]),
                        f" … ({len(names)} in all)" if len(names) > 20 else "")

    def sampling_params(self, request: SamplingFields, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None = None, **extra: Any) -> SamplingParams:
        """The request's `SamplingParams`; `extra` are further fields (constraints, thinking budget)."""
        check_sampling(request.stop, request.stop_token_ids, request.logit_bias)
        logit_bias = check_logit_bias(request.logit_bias, self.engine.engine.model_config.vocab_size)
        if request.stream and request.prompt_logprobs is not None:
            # As in vLLM: the field belongs to the whole response, which a stream never sends in one piece.
            raise RequestError("prompt_logprobs is not available with stream=true", param="prompt_logprobs")
        values: dict[str, Any] = dict(
            n=request.n, max_tokens=max_tokens, stop=request.stop, stop_token_ids=request.stop_token_ids,
            ignore_eos=request.ignore_eos, seed=request.seed, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            skip_special_tokens=request.skip_special_tokens,
            include_stop_str_in_output=request.include_stop_str_in_output, logit_bias=logit_bias, **extra,
        )
        values.update({name: getattr(request, name) for name in SAMPLING_FIELDS if getattr(request, name) is not None})
        try:
            return SamplingParams(**values)
        except ValueError as e:
            raise RequestError(str(e), param=str(e).split()[0]) from None

    def check_context(self, num_prompt_tokens: int, max_tokens: int | None, where: str) -> None:
        limit = self.max_model_len
        if max_tokens is not None and num_prompt_tokens + max_tokens > limit:
            raise RequestError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the {where}, {max_tokens} in the "
                "completion). Please reduce the length of the input or of max_tokens.",
                param="max_tokens" if num_prompt_tokens < limit else where, code="context_length_exceeded")
        if num_prompt_tokens >= limit:
            raise RequestError(
                f"This model's maximum context length is {limit} tokens. However, your {where} resulted in "
                f"{num_prompt_tokens} tokens, leaving none for the completion. Please reduce the length of the input.",
                param=where, code="context_length_exceeded")

    async def prompt_ids(self, text: str, max_tokens: int | None, where: str, check: bool = True) -> list[int]:
        """`text` tokenized in a worker thread, and checked against the context length (a text too long by its
        length alone is refused even unchecked: /tokenize)."""
        self._need_tokenizer()
        if self.max_token_bytes:
            at_least = -(-len(text) // self.max_token_bytes)  # a character is at least one byte
            if at_least >= self.max_model_len:
                raise RequestError(
                    f"This model's maximum context length is {self.max_model_len} tokens. However, your {where} has "
                    f"{len(text)} characters, which are at least {at_least} tokens, leaving none for the completion. "
                    "Please reduce the length of the input.", param=where, code="context_length_exceeded")
        ids = await asyncio.to_thread(self.tokenizer.encode, text)
        if check:
            self.check_context(len(ids), max_tokens, where)
        return ids

    async def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                     arrival_time: float, model: str | None = None) -> RequestStream:
        """Hand a request to the engine; `model` names a served LoRA adapter or the base model."""
        try:
            return await self.engine.add_request(request_id, prompt_ids, params, arrival_time,
                                                 lora_request=self.loras.get(model))
        except ValueError as e:  # the engine's own checks, e.g. token ids outside the vocabulary
            raise RequestError(str(e)) from None
        except EngineError as e:
            raise RequestError(str(e), status=503, type="service_unavailable") from None

    async def final_output(self, request_id: str, stream: RequestStream, raw: Request) -> RequestOutput:
        """Wait for the finished output; abort the request if the client goes away first."""

        async def last() -> RequestOutput:
            total = OutputAccumulator()
            async for output in stream:
                total.add(output)
            return total.result()

        async def disconnected() -> None:
            while (await raw.receive())["type"] != "http.disconnect":
                pass

        result, gone = asyncio.ensure_future(last()), asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not result.done():
                result.cancel()
                self.engine.abort(request_id)
        if not result.done() or result.cancelled():
            raise ClientDisconnected(request_id)
        try:
            return result.result()
        except EngineError as e:
            raise RequestError(str(e), status=500, type="server_error") from None

    def prompt_logprobs(self, output: RequestOutput, k: int | None) -> PromptLogprobs | None:
        """vLLM's `prompt_logprobs` field: per prompt token {token id: logprob, rank, decoded token}, None first;
        None when the request did not ask for it (`k` is its `prompt_logprobs`)."""
        if k is None or output.prompt_logprobs is None:
            return None
        out: PromptLogprobs = []
        for entry in output.prompt_logprobs:
            if entry is None:
                out.append(None)
                continue
            # The entry is the prompt's token, then the top k. With k + 1 entries the prompt's token is outside the
            # top k: it sorts last and its rank is unknown.
            token_id = next(iter(entry))
            order = [t for t in sorted(entry, key=entry.get, reverse=True) if len(entry) <= k or t != token_id]
            ranks = {t: rank for rank, t in enumerate(order, start=1)}
            out.append({t: PromptLogprob(logprob=max(lp, -9999.0), rank=ranks.get(t),
                                         decoded_token=self._token_logprob(t, lp).token) for t, lp in entry.items()})
        return out

    def _token_logprob(self, token_id: int, logprob: float) -> TopLogprob:
        if self.tokenizer is None:
            return TopLogprob(token=f"token_id:{token_id}", logprob=max(logprob, -9999.0))
        raw = self.tokenizer.token_bytes(token_id)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:  # part of a character: shown as OpenAI does, "bytes:\\xe5\\x8c"
            text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return TopLogprob(token=text, logprob=max(logprob, -9999.0), bytes=list(raw))


# ---------------------------------------------------------------------------------------------------
# Helpers


def model_name_served(name: str, served: list[str]) -> bool:
    return any(name == s or (("*" in s or "?" in s) and fnmatch.fnmatchcase(name, s)) for s in served)


def usage_of(output: RequestOutput, completion_tokens: int | None = None) -> Usage:
    """Token counts (`completion_tokens` counted by the caller when `output` is the last of a stream's deltas); with
    MTP also the drafts the answer verified, as OpenAI's Predicted Outputs counts (`accepted_prediction_tokens` /
    `rejected_prediction_tokens`), so a client can show the acceptance rate."""
    prompt = len(output.prompt_token_ids)
    completion = sum(len(c.token_ids) for c in output.outputs) if completion_tokens is None else completion_tokens
    details = None
    if "spec_draft_tokens" in output.metrics:
        accepted = output.metrics["spec_accepted_tokens"]
        details = {"accepted_prediction_tokens": accepted,
                   "rejected_prediction_tokens": output.metrics["spec_draft_tokens"] - accepted}
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details={"cached_tokens": output.num_cached_tokens},
                 completion_tokens_details=details)


def sum_usage(usages: list[Usage]) -> Usage:
    prompt = sum(u.prompt_tokens for u in usages)
    completion = sum(u.completion_tokens for u in usages)
    cached = sum((u.prompt_tokens_details or {}).get("cached_tokens", 0) for u in usages)
    details = None
    if any(u.completion_tokens_details for u in usages):
        details = {key: sum((u.completion_tokens_details or {}).get(key, 0) for u in usages)
                   for key in ("accepted_prediction_tokens", "rejected_prediction_tokens")}
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details={"cached_tokens": cached}, completion_tokens_details=details)
