"""`/v1/chat/completions`: messages and tools → the GLM-4.5 prompt → the engine → message or SSE stream.

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

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.responses import JSONResponse, Response

from glm45.chat import render_chat
from glm45.engine.sequence import RequestOutput
from glm45.parsers import ChatOutputParser, ContentDelta, ReasoningDelta, ToolCallDelta, parse_chat_output
from glm45.server.async_engine import EngineError, RequestStream
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
    TokenLogprob,
    ToolCallOut,
    plain_messages,
    random_id,
)
from glm45.server.serving import OpenAIServing, RequestError, SSEResponse, sse, usage_of

logger = logging.getLogger(__name__)


@dataclass
class ChatPlan:
    """How one chat request runs: the prompt, and how its output is parsed."""

    prompt: str
    prompt_ids: list[int]
    forced_prefix: str               # text the answer was prefilled with (tool_choice required/named)
    tools: list[dict] | None         # tools the output is parsed for; None: no tool-call parsing
    reasoning: bool                  # parse `<think>…</think>` into reasoning_content
    single_call: bool                # parallel_tool_calls=false: keep only the first call


class OpenAIServingChat(OpenAIServing):
    def plan_chat(self, request: ChatCompletionRequest) -> ChatPlan:
        """Check the request's messages, tools and tool_choice; render and tokenize the prompt."""
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
        response = ChatCompletionResponse(id=request_id, model=model, choices=choices, usage=usage_of(final))
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
                                              usage=usage_of(final)))
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
