"""Chat and text completions: an OpenAI request in, an engine request through, a response or SSE stream out.

Everything the client could have got wrong is checked before the engine sees the request and before any
byte of the response is sent, so mistakes become a `RequestError` (an OpenAI error JSON with status 400
or 404) and never a broken stream. The order: model name, messages and tools (rendered with the GLM-4.5
template), sampling values, then the context length with the numbers in the message.

Chat output goes through the GLM-4.5 parsers: with thinking on, `<think>…</think>` becomes
`reasoning_content`; tool calls become `tool_calls` with JSON-string arguments. A non-streamed answer is
parsed in one shot; a stream is parsed incrementally (`ChatOutputParser`), and the two agree for every
chunking (the parsers' tests pin this down), so a seeded request gives the same result either way.

`tool_choice`:
- "auto" (the default when tools are given): the tools are in the prompt and the model decides.
- "none": the tools are left out of the prompt and the output is not parsed for calls.
- "required" and a named function: the answer is *prefilled* — the prompt ends with an empty thought
  block and `<tool_call>` (or `<tool_call>NAME\\n`), exactly as a past turn that called a tool is
  rendered, so the model continues inside a call. There is no grammar-constrained decoding: if the model
  then writes no valid call (an unknown name, or no `</tool_call>` before `max_tokens`), the response
  honestly has no tool call and `finish_reason` is "stop" or "length", never "tool_calls" (a stream has
  already sent the call's name by then, so it ends with that call's partial arguments and "length").
  Prefilling skips the thinking of that turn.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from glm45.chat import render_chat
from glm45.engine.sampling_params import SamplingParams
from glm45.engine.sequence import RequestOutput
from glm45.parsers import ChatOutputParser, ContentDelta, ReasoningDelta, ToolCallDelta, parse_chat_output
from glm45.server.async_engine import AsyncEngine, EngineError, RequestStream
from glm45.server.config import ServerConfig
from glm45.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    FunctionCallOut,
    NamedToolChoice,
    SamplingFields,
    TokenLogprob,
    ToolCallOut,
    TopLogprob,
    Usage,
    plain_messages,
    random_id,
)

logger = logging.getLogger(__name__)

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                   "repetition_penalty")


class RequestError(Exception):
    """A client mistake, answered with the OpenAI error JSON and `status`."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type

    def to_json(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ClientDisconnected(Exception):
    """The client went away before its answer was ready; the request was aborted, no one is left to answer."""


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


@dataclass
class ChatPlan:
    """How one chat request runs: the prompt, and how its output is parsed."""

    prompt: str
    prompt_ids: list[int]
    forced_prefix: str               # text the answer was prefilled with (tool_choice required/named)
    tools: list[dict] | None         # tools the output is parsed for; None: no tool-call parsing
    reasoning: bool                  # parse `<think>…</think>` into reasoning_content
    single_call: bool                # parallel_tool_calls=false: keep only the first call


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, config: ServerConfig, model_names: list[str]):
        self.engine = engine
        self.config = config
        self.model_names = model_names
        self.tokenizer = engine.engine.tokenizer
        self.max_model_len = engine.engine.max_model_len
        self.chat_template = config.load_chat_template()

    # ------------------------------------------------------------------ shared checks
    def check_model(self, name: str | None) -> str:
        if name is not None and name not in self.model_names:
            raise RequestError(f"The model `{name}` does not exist. Served models: {', '.join(self.model_names)}",
                               status=404, param="model", code="model_not_found")
        return name or self.model_names[0]

    def _need_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise RequestError("this model has no tokenizer: only /v1/completions with token-id prompts works")

    @staticmethod
    def _ignore_extras(request: SamplingFields) -> None:
        if request.model_extra:
            logger.info("ignoring unsupported request fields: %s", ", ".join(sorted(request.model_extra)))

    @staticmethod
    def sampling_params(request: SamplingFields, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        if request.logit_bias:
            raise RequestError("logit_bias is not supported by this server", param="logit_bias")
        values: dict[str, Any] = dict(
            n=request.n, max_tokens=max_tokens, stop=request.stop, stop_token_ids=request.stop_token_ids,
            ignore_eos=request.ignore_eos, seed=request.seed, logprobs=logprobs,
            skip_special_tokens=request.skip_special_tokens,
            include_stop_str_in_output=request.include_stop_str_in_output,
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

    async def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                     arrival_time: float) -> RequestStream:
        try:
            return await self.engine.add_request(request_id, prompt_ids, params, arrival_time)
        except ValueError as e:  # the engine's own checks, e.g. token ids outside the vocabulary
            raise RequestError(str(e)) from None
        except EngineError as e:
            raise RequestError(str(e), status=503, type="service_unavailable") from None

    async def final_output(self, request_id: str, stream: RequestStream, raw: Request) -> RequestOutput:
        """Wait for the finished output; abort the request if the client goes away first."""

        async def last() -> RequestOutput:
            final = None
            async for output in stream:
                final = output
            return final

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

    # ------------------------------------------------------------------ chat completions
    def plan_chat(self, request: ChatCompletionRequest) -> ChatPlan:
        self._need_tokenizer()
        kwargs = {**(self.config.default_chat_template_kwargs or {}), **(request.chat_template_kwargs or {})}
        enable_thinking = kwargs.get("enable_thinking", True)
        if not isinstance(enable_thinking, bool):
            raise RequestError(f"chat_template_kwargs.enable_thinking must be true or false, got {enable_thinking!r}",
                               param="chat_template_kwargs")
        tools = [tool.model_dump(exclude_none=True) for tool in request.tools] if request.tools else None
        choice = request.tool_choice if request.tool_choice is not None else ("auto" if tools else "none")
        forced_name = choice.function.name if isinstance(choice, NamedToolChoice) else None
        if choice != "none" and not tools:
            raise RequestError(f"tool_choice {_show(choice)} needs `tools`, and the request has none",
                               param="tool_choice")
        if forced_name is not None and forced_name not in {t["function"]["name"] for t in tools}:
            raise RequestError(f"tool_choice names the function {forced_name!r}, which is not in `tools` "
                               f"({', '.join(t['function']['name'] for t in tools)})", param="tool_choice")
        if choice != "none" and self.config.tool_call_parser == "none":
            raise RequestError("tool calls need the server to run with --tool-call-parser glm45", param="tool_choice")
        if choice == "auto" and not self.config.enable_auto_tool_choice:
            raise RequestError('"auto" tool choice needs the server to run with --enable-auto-tool-choice',
                               param="tool_choice")
        try:
            prompt = render_chat(plain_messages(request.messages), tools=tools if choice != "none" else None,
                                 enable_thinking=enable_thinking, add_generation_prompt=request.add_generation_prompt,
                                 chat_template=self.chat_template)
        except ValueError as e:
            raise RequestError(str(e), param="messages") from None

        forced_prefix = ""
        if choice == "required" or forced_name is not None:
            forced_prefix = "<tool_call>" if forced_name is None else f"<tool_call>{forced_name}\n"
            # Continue the turn exactly as a past turn that called a tool is rendered.
            if prompt.endswith("</think>"):
                prompt += "\n" + forced_prefix
            elif prompt.endswith("<|assistant|>"):
                prompt += "\n<think></think>\n" + forced_prefix
            else:
                raise RequestError(f"tool_choice {_show(choice)} needs a prompt that ends with the assistant's turn "
                                   "(add_generation_prompt=true)", param="tool_choice")
        reasoning = self.config.reasoning_parser == "glm45" and enable_thinking and not forced_prefix
        return ChatPlan(prompt=prompt, prompt_ids=self.tokenizer.encode(prompt), forced_prefix=forced_prefix,
                        tools=tools if choice != "none" else None, reasoning=reasoning,
                        single_call=not request.parallel_tool_calls or forced_name is not None)

    async def create_chat_completion(self, request: ChatCompletionRequest, raw: Request) -> Response:
        arrival = time.monotonic()
        model = self.check_model(request.model)
        self._ignore_extras(request)
        plan = self.plan_chat(request)
        if request.response_format is not None and request.response_format.type != "text":
            raise RequestError(f"response_format {request.response_format.type!r} is not supported: this server has "
                               "no constrained decoding; ask for JSON in the prompt instead", param="response_format")
        if request.top_logprobs is not None and not request.logprobs:
            raise RequestError("top_logprobs needs logprobs=true", param="top_logprobs")
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        max_tokens = request.max_completion_tokens or request.max_tokens
        params = self.sampling_params(request, max_tokens, logprobs)
        self.check_context(len(plan.prompt_ids), max_tokens, "messages")
        request_id = random_id("chatcmpl")
        stream = await self.submit(request_id, plan.prompt_ids, params, arrival)
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return SSEResponse(self._chat_stream(request_id, model, plan, stream, request.n, logprobs,
                                                 include_usage))
        final = await self.final_output(request_id, stream, raw)
        choices = []
        for completion in final.outputs:
            parsed = parse_chat_output(plan.forced_prefix + completion.text, plan.tools, reasoning=plan.reasoning)
            calls = parsed.tool_calls[:1] if plan.single_call else parsed.tool_calls
            tool_calls = [ToolCallOut(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCallOut(
                name=call["name"], arguments=json.dumps(call["arguments"], ensure_ascii=False))) for call in calls]
            message = ChatMessageOut(content=parsed.content, reasoning_content=parsed.reasoning,
                                     tool_calls=tool_calls or None)
            choices.append(ChatChoice(index=completion.index, message=message,
                                      finish_reason=_finish_reason(completion.finish_reason, bool(calls)),
                                      logprobs=self._chat_logprobs(completion.logprobs, logprobs),
                                      stop_reason=completion.stop_reason))
        response = ChatCompletionResponse(id=request_id, model=model, choices=choices, usage=_usage(final))
        return JSONResponse(response.model_dump(mode="json"))

    async def _chat_stream(self, request_id: str, model: str, plan: ChatPlan, stream: RequestStream, n: int,
                           top_logprobs: int | None, include_usage: bool) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(index: int, delta: DeltaMessage, finish_reason: str | None = None,
                  logprobs: ChoiceLogprobs | None = None) -> str:
            choice = ChatChunkChoice(index=index, delta=delta, finish_reason=finish_reason, logprobs=logprobs)
            return sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=[choice]))

        parsers = [ChatOutputParser(plan.tools, reasoning=plan.reasoning) for _ in range(n)]
        text_sent, logprobs_sent, num_calls, done = [0] * n, [0] * n, [0] * n, [False] * n
        final: RequestOutput | None = None
        try:
            for index in range(n):
                yield chunk(index, DeltaMessage(role="assistant"))
                for event in parsers[index].feed(plan.forced_prefix):
                    yield chunk(index, _event_delta(event))
            async for output in stream:
                final = output
                for completion in output.outputs:
                    i = completion.index
                    if done[i]:
                        continue
                    events = parsers[i].feed(completion.text[text_sent[i]:])
                    text_sent[i] = len(completion.text)
                    if completion.finish_reason is not None:
                        events += parsers[i].finish()
                        done[i] = True
                    if plan.single_call:
                        events = [e for e in events if not (isinstance(e, ToolCallDelta) and e.index > 0)]
                    num_calls[i] = max([num_calls[i], *(e.index + 1 for e in events if isinstance(e, ToolCallDelta))])
                    new_logprobs = None
                    if completion.logprobs is not None and len(completion.logprobs) > logprobs_sent[i]:
                        new_logprobs = self._chat_logprobs(completion.logprobs[logprobs_sent[i]:], top_logprobs)
                        logprobs_sent[i] = len(completion.logprobs)
                    if not events and new_logprobs is not None:
                        yield chunk(i, DeltaMessage(), logprobs=new_logprobs)
                    for k, event in enumerate(events):
                        yield chunk(i, _event_delta(event), logprobs=new_logprobs if k == 0 else None)
                    if done[i]:
                        reason = _finish_reason(completion.finish_reason, num_calls[i] > 0)
                        yield chunk(i, DeltaMessage(), finish_reason=reason)
            if include_usage and final is not None:
                yield sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=[],
                                              usage=_usage(final)))
        except EngineError as e:
            logger.error("request %s failed: %s", request_id, e)
            yield sse(json.dumps(RequestError(str(e), status=500, type="server_error").to_json()))
        finally:
            if not stream.finished:
                self.engine.abort(request_id)
        yield sse("[DONE]")

    def _chat_logprobs(self, entries: list[dict[int, float]] | None, k: int | None) -> ChoiceLogprobs | None:
        if entries is None or k is None:
            return None
        content = []
        for entry in entries:
            token_id, logprob = next(iter(entry.items()))  # the sampled token comes first
            top = sorted(entry.items(), key=lambda item: -item[1])[:k]
            content.append(TokenLogprob(**self._token_logprob(token_id, logprob).model_dump(),
                                        top_logprobs=[self._token_logprob(t, lp) for t, lp in top]))
        return ChoiceLogprobs(content=content)

    def _token_logprob(self, token_id: int, logprob: float) -> TopLogprob:
        if self.tokenizer is None:
            return TopLogprob(token=f"token_id:{token_id}", logprob=max(logprob, -9999.0))
        raw = _token_bytes(self.tokenizer, token_id)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:  # part of a character: shown as OpenAI does, "bytes:\\xe5\\x8c"
            text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return TopLogprob(token=text, logprob=max(logprob, -9999.0), bytes=list(raw))

    # ------------------------------------------------------------------ text completions
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
        usage = _sum_usage([_usage(final) for final in finals])
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
                usage = _sum_usage([_usage(final) for final in finals.values()])
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


# ---------------------------------------------------------------------------------------------------
# Helpers


@functools.lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (which GLM-4.5's tokenizer uses): printable character → byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """The exact bytes of one token (a byte-level token may hold part of a UTF-8 character)."""
    piece = tokenizer.id_to_token(token_id) or ""
    alphabet = _byte_level_alphabet()
    if piece and all(ch in alphabet for ch in piece):
        return bytes(alphabet[ch] for ch in piece)
    return tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")  # added tokens: their text


def _show(choice: Any) -> str:
    return json.dumps(choice.model_dump()) if isinstance(choice, NamedToolChoice) else repr(choice)


def _finish_reason(engine_reason: str | None, called_tools: bool) -> str | None:
    # A turn that ended on its own after a tool call ends for the call (the model stops at <|observation|>).
    return "tool_calls" if called_tools and engine_reason == "stop" else engine_reason


def _event_delta(event: Any) -> DeltaMessage:
    if isinstance(event, ReasoningDelta):
        return DeltaMessage(reasoning_content=event.text)
    if isinstance(event, ContentDelta):
        return DeltaMessage(content=event.text)
    return DeltaMessage(tool_calls=[event.to_openai()])


def _usage(output: RequestOutput) -> Usage:
    prompt = len(output.prompt_token_ids)
    completion = sum(len(c.token_ids) for c in output.outputs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details={"cached_tokens": output.num_cached_tokens})


def _sum_usage(usages: list[Usage]) -> Usage:
    prompt = sum(u.prompt_tokens for u in usages)
    completion = sum(u.completion_tokens for u in usages)
    cached = sum((u.prompt_tokens_details or {}).get("cached_tokens", 0) for u in usages)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details={"cached_tokens": cached})


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
