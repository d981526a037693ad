"""`/v1/chat/completions`: messages and tools → the GLM-4.5 prompt → the engine → message or SSE stream.

Chat output goes through the GLM-4.5 parsers: with thinking on, `<think>…</think>` becomes
`reasoning_content`; tool calls become `tool_calls` with JSON-string arguments. A non-streamed answer is
parsed in one shot; a stream is parsed incrementally (`ChatOutputParser`), and the two agree for every
chunking (the parsers' tests pin this down), so a seeded request gives the same result either way.

Planning (template kwargs, tools, `tool_choice`) and parsing the answer are `glm45.chat`'s: `plan_chat` and
`AssistantTurn`, shared with `LLM.chat`, /tokenize and the terminal chat. `tool_choice` "required" or a named
function prefills the start of a call and has the rest decoded by the call's grammar (declared names, arguments
typed by their schemas, closed before `max_tokens`), so the answer is a valid call with `finish_reason`
"tool_calls". `response_format` and the other decoding controls are read by `controls.py`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from starlette.responses import JSONResponse, Response

from glm45.chat import AssistantTurn, ChatPlan, ChatRequestError, assemble_turn, plan_chat
from glm45.engine.sequence import RequestOutput
from glm45.parsers import ContentDelta, ReasoningDelta, ToolCallDelta
from glm45.server import controls
from glm45.server.async_engine import RequestStream
from glm45.server.limits import check_sequences, check_tools
from glm45.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    ChoiceLogprobs,
    DeltaMessage,
    FunctionCallOut,
    NamedToolChoice,
    TokenizeRequest,
    TokenLogprob,
    ToolCallOut,
    plain_messages,
    random_id,
)
from glm45.server.serving import OpenAIServing, RequestError, SSEResponse, error_event, sse, usage_of

logger = logging.getLogger(__name__)


class OpenAIServingChat(OpenAIServing):
    def plan_chat(self, request: ChatCompletionRequest | TokenizeRequest) -> ChatPlan:
        """Check the request's messages, tools and tool_choice and render the prompt (`glm45.chat.plan_chat`);
        /tokenize plans its messages the same way, as a chat request without tool_choice. Blocking: it runs in
        a worker thread."""
        self._need_tokenizer()
        choice = getattr(request, "tool_choice", None)
        tools = [tool.model_dump(exclude_none=True) for tool in request.tools] if request.tools else None
        check_tools(tools)
        try:
            return plan_chat(
                plain_messages(request.messages),
                tools=tools,
                tool_choice=choice.model_dump() if isinstance(choice, NamedToolChoice) else choice,
                template_kwargs=controls.thinking_kwargs(request) if isinstance(request, ChatCompletionRequest)
                else request.chat_template_kwargs,
                default_template_kwargs=self.config.default_chat_template_kwargs,
                add_generation_prompt=request.add_generation_prompt, chat_template=self.chat_template,
                parallel_tool_calls=getattr(request, "parallel_tool_calls", True),
                parse_reasoning=self.config.reasoning_parser == "glm45",
                parse_tool_calls=self.config.tool_call_parser == "glm45",
                auto_tool_choice=self.config.enable_auto_tool_choice,
                tool_call_constraint=self.config.tool_call_constraint)
        except ChatRequestError as e:
            raise RequestError(str(e), param=e.param) from None

    async def create_chat_completion(self, request: ChatCompletionRequest, raw: Request) -> Response:
        arrival = time.monotonic()
        model = self.check_model(request.model)
        self._ignore_extras(request)
        check_sequences(1, request.n)
        answer = controls.answer_format(request)
        plan = await asyncio.to_thread(self.plan_chat, request)
        if request.top_logprobs is not None and not request.logprobs:
            raise RequestError("top_logprobs needs logprobs=true", param="top_logprobs")
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        max_tokens = request.max_tokens if request.max_completion_tokens is None else request.max_completion_tokens
        spec = controls.structured_outputs(plan, answer)
        params = self.sampling_params(request, max_tokens, logprobs, request.prompt_logprobs, structured_outputs=spec,
                                      thinking_budget=controls.thinking_budget(request, max_tokens))
        await asyncio.to_thread(controls.check_grammar, self.engine.engine, spec,
                                "response_format" if answer else "tool_choice")
        prompt_ids = await self.prompt_ids(plan.prompt, max_tokens, "messages")
        request_id = random_id("chatcmpl")
        stream = await self.submit(request_id, prompt_ids, params, arrival, model)
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return SSEResponse(self._chat_stream(request_id, model, plan, stream, request.n, logprobs,
                                                 include_usage))
        final = await self.final_output(request_id, stream, raw)
        choices = []
        for completion in final.outputs:
            turn = assemble_turn(completion.text, plan)
            tool_calls = [ToolCallOut(id=call.id, function=FunctionCallOut(name=call.name, arguments=call.arguments))
                          for call in turn.tool_calls]
            message = ChatMessageOut(content=turn.content, reasoning_content=turn.reasoning,
                                     tool_calls=tool_calls or None)
            choices.append(ChatChoice(index=completion.index, message=message,
                                      finish_reason=_finish_reason(completion.finish_reason, bool(tool_calls)),
                                      logprobs=self._chat_logprobs(completion.logprobs, logprobs),
                                      stop_reason=completion.stop_reason))
        response = ChatCompletionResponse(id=request_id, model=model, choices=choices, usage=usage_of(final),
                                          prompt_logprobs=self.prompt_logprobs(final, request.prompt_logprobs))
        return JSONResponse(response.model_dump(mode="json"))

    async def _chat_stream(self, request_id: str, model: str, plan: ChatPlan, stream: RequestStream, n: int,
                           top_logprobs: int | None, include_usage: bool) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(index: int, delta: DeltaMessage, finish_reason: str | None = None,
                  logprobs: ChoiceLogprobs | None = None) -> str:
            choice = ChatChunkChoice(index=index, delta=delta, finish_reason=finish_reason, logprobs=logprobs)
            return sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=[choice]))

        turns = [AssistantTurn.for_plan(plan) for _ in range(n)]
        num_calls, done, completion_tokens = [0] * n, [False] * n, 0
        final: RequestOutput | None = None
        try:
            for index in range(n):
                yield chunk(index, DeltaMessage(role="assistant"))
                for event in turns[index].prefix_events:
                    yield chunk(index, _event_delta(event))
            async for output in stream:  # deltas: each output carries what is new
                final = output
                for completion in output.outputs:
                    i = completion.index
                    completion_tokens += len(completion.token_ids)
                    if done[i]:
                        continue
                    events = turns[i].feed(completion.text)
                    if completion.finish_reason is not None:
                        events += turns[i].finish()
                        done[i] = True
                    num_calls[i] = max([num_calls[i], *(e.index + 1 for e in events if isinstance(e, ToolCallDelta))])
                    new_logprobs = None
                    if completion.logprobs:
                        new_logprobs = self._chat_logprobs(completion.logprobs, top_logprobs)
                    if not events and new_logprobs is not None:
                        yield chunk(i, DeltaMessage(), logprobs=new_logprobs)
                    for k, event in enumerate(events):
                        yield chunk(i, _event_delta(event), logprobs=new_logprobs if k == 0 else None)
                    if done[i]:
                        reason = _finish_reason(completion.finish_reason, num_calls[i] > 0)
                        yield chunk(i, DeltaMessage(), finish_reason=reason)
            if include_usage and final is not None:
                yield sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=[],
                                              usage=usage_of(final, completion_tokens)))
        except Exception as e:  # the stream has started: end it with an error event, never a cut connection
            yield error_event(request_id, e)
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


def _finish_reason(engine_reason: str | None, called_tools: bool) -> str | None:
    # A turn that ended on its own after a tool call ends for the call (the model stops at <|observation|>).
    return "tool_calls" if called_tools and engine_reason == "stop" else engine_reason


def _event_delta(event: Any) -> DeltaMessage:
    if isinstance(event, ReasoningDelta):
        return DeltaMessage(reasoning_content=event.text)
    if isinstance(event, ContentDelta):
        return DeltaMessage(content=event.text)
    return DeltaMessage(tool_calls=[event.to_openai()])
