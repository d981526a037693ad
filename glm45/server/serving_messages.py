"""`POST /v1/messages` and `/v1/messages/count_tokens`: the Anthropic Messages API (what Claude Code speaks).

A request is read onto a GLM-4.5 chat (`anthropic_protocol.py`), planned and rendered like any chat
(`glm45.chat.plan_chat`: thinking, tools, tool choice and its grammar), run by the same engine, and its output
parsed by the same `AssistantTurn`. The parser's events become Anthropic content blocks in one place,
`ContentBlocks`: a block opens when the kind of text changes — `thinking`, `text`, one `tool_use` per call —
so a streamed answer (`message_start`, `ping`, per block `content_block_start` / `content_block_delta` with
`thinking_delta`, `text_delta` or `input_json_delta` / `content_block_stop`, then `message_delta` with the
`stop_reason` and `message_stop`) and a whole one have the same blocks by construction. Thinking blocks carry a
`signature` (a digest of their text: GLM's thoughts are not encrypted; clients send it back and it is ignored).

Errors have Anthropic's shape (`{"type": "error", "error": {"type", "message"}}`) and status codes, raised before
any byte of the answer; a failure after the stream started ends it with an `error` event.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from starlette.responses import JSONResponse, Response

from glm45.chat import AssistantTurn, ChatPlan, ChatRequestError, plan_chat
from glm45.engine.sampling_params import SamplingParams
from glm45.parsers import ContentDelta, Event, ReasoningDelta
from glm45.server import anthropic_protocol as ap
from glm45.server.async_engine import EngineError, RequestStream
from glm45.server.controls import check_grammar
from glm45.server.errors import RequestError
from glm45.server.limits import check_sampling, check_schema, check_tools
from glm45.server.serving import OpenAIServing, SSEResponse

logger = logging.getLogger(__name__)


def _event(name: str, payload: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"


def signature(thinking: str) -> str:
    return base64.b64encode(hashlib.sha256(thinking.encode("utf-8")).digest()).decode()


class ContentBlocks:
    """Parser events → Anthropic content blocks, and the stream events that build them."""

    def __init__(self):
        self.blocks: list[dict[str, Any]] = []
        self._key: tuple | None = None
        self._arguments: dict[int, str] = {}

    def feed(self, events: list[Event]) -> list[str]:
        out = []
        for event in events:
            if isinstance(event, ReasoningDelta):
                key, block, delta = ("thinking",), {"type": "thinking", "thinking": "", "signature": ""}, \
                    {"type": "thinking_delta", "thinking": event.text}
            elif isinstance(event, ContentDelta):
                key, block, delta = ("text",), {"type": "text", "text": ""}, {"type": "text_delta", "text": event.text}
            else:
                key = ("tool_use", event.index)
                block = {"type": "tool_use", "id": event.id, "name": event.name, "input": {}}
                delta = {"type": "input_json_delta", "partial_json": event.arguments}
            if key != self._key:
                out += self._close()
                self._key = key
                self.blocks.append(block)
                out.append(_event("content_block_start", {"type": "content_block_start",
                                                          "index": len(self.blocks) - 1, "content_block": block}))
            self._add(delta, key)
            if delta.get("partial_json", True) != "":  # a call's first delta may carry no arguments yet
                out.append(_event("content_block_delta", {"type": "content_block_delta",
                                                          "index": len(self.blocks) - 1, "delta": delta}))
        return out

    def _add(self, delta: dict[str, Any], key: tuple) -> None:
        block = self.blocks[-1]
        if delta["type"] == "thinking_delta":
            block["thinking"] += delta["thinking"]
        elif delta["type"] == "text_delta":
            block["text"] += delta["text"]
        else:
            self._arguments[key[1]] = self._arguments.get(key[1], "") + delta["partial_json"]

    def _close(self) -> list[str]:
        if self._key is None:
            return []
        index, block, out = len(self.blocks) - 1, self.blocks[-1], []
        if block["type"] == "thinking":
            block["signature"] = signature(block["thinking"])
            out.append(_event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                      "delta": {"type": "signature_delta",
                                                                "signature": block["signature"]}}))
        elif block["type"] == "tool_use":
            block["input"] = ap.tool_input(self._arguments.get(self._key[1], ""))
        self._key = None
        return out + [_event("content_block_stop", {"type": "content_block_stop", "index": index})]

    def close(self) -> list[str]:
        return self._close()

    @property
    def called_tools(self) -> bool:
        return any(block["type"] == "tool_use" for block in self.blocks)


class AnthropicServingMessages(OpenAIServing):
    def plan(self, request: ap.MessagesRequest | ap.CountTokensRequest) -> tuple[ChatPlan, int | None, Any]:
        """The chat plan of a request, its thinking budget and what constrains its answer. Blocking: runs in a
        worker thread."""
        self._need_tokenizer()
        tools = ap.chat_tools(request.tools)
        check_tools(tools)
        choice, parallel = ap.chat_tool_choice(request.tool_choice)
        enable_thinking, budget = ap.thinking_settings(request.thinking, getattr(request, "max_tokens", None))
        try:
            plan = plan_chat(ap.chat_messages(request.system, request.messages), tools=tools, tool_choice=choice,
                             template_kwargs={"enable_thinking": enable_thinking},
                             default_template_kwargs=self.config.default_chat_template_kwargs,
                             chat_template=self.chat_template, parallel_tool_calls=parallel,
                             parse_reasoning=self.config.reasoning_parser == "glm45",
                             parse_tool_calls=self.config.tool_call_parser == "glm45",
                             auto_tool_choice=self.config.enable_auto_tool_choice,
                             tool_call_constraint=self.config.tool_call_constraint)
        except ChatRequestError as e:
            raise RequestError(str(e), param=e.param) from None
        schema = ap.output_schema(request) if isinstance(request, ap.MessagesRequest) else None
        if schema is not None:
            check_schema(schema, "output_config.format.schema")
        if isinstance(request, ap.MessagesRequest) and budget is None and plan.thinks:
            budget = ap.effort_budget(request)
        try:
            spec = plan.structured_outputs(json=schema)
        except ValueError as e:
            raise RequestError(str(e), param="output_config.format") from None
        check_grammar(self.engine.engine, spec, "output_config.format" if schema is not None else "tool_choice")
        return plan, budget, spec

    def _params(self, request: ap.MessagesRequest, spec: Any, budget: int | None) -> SamplingParams:
        check_sampling(request.stop_sequences, None, None)
        values = {name: getattr(request, name) for name in ("temperature", "top_p", "top_k")
                  if getattr(request, name) is not None}
        try:
            return SamplingParams(max_tokens=request.max_tokens, stop=request.stop_sequences, **values,
                                  structured_outputs=spec, thinking_budget=budget)
        except ValueError as e:
            raise RequestError(str(e), param=str(e).split()[0]) from None

    async def count_tokens(self, request: ap.CountTokensRequest) -> dict[str, int]:
        self.check_model(request.model)
        plan, _, _ = await asyncio.to_thread(self.plan, request)
        ids = await self.prompt_ids(plan.prompt, None, "messages", check=False)
        return {"input_tokens": len(ids)}

    async def create_message(self, request: ap.MessagesRequest, raw: Request) -> Response:
        arrival = time.monotonic()
        model = self.check_model(request.model)
        if request.model_extra:
            logger.info("ignoring unsupported request fields: %s", ", ".join(sorted(request.model_extra)[:20]))
        plan, budget, spec = await asyncio.to_thread(self.plan, request)
        params = self._params(request, spec, budget)
        prompt_ids = await self.prompt_ids(plan.prompt, request.max_tokens, "messages")
        request_id = ap.message_id()
        stream = await self.submit(request_id, prompt_ids, params, arrival)
        if request.stream:
            return SSEResponse(self._stream(request_id, model, plan, stream, len(prompt_ids)))
        final = await self.final_output(request_id, stream, raw)
        completion = final.outputs[0]
        turn, blocks = AssistantTurn.for_plan(plan), ContentBlocks()
        blocks.feed(turn.prefix_events + turn.feed(completion.text) + turn.finish())
        blocks.close()
        reason, stop_sequence = ap.stop_reason(completion.finish_reason, completion.stop_reason, blocks.called_tools)
        return JSONResponse({
            "id": request_id, "type": "message", "role": "assistant", "model": model, "content": blocks.blocks,
            "stop_reason": reason, "stop_sequence": stop_sequence,
            "usage": {"input_tokens": len(final.prompt_token_ids), "output_tokens": len(completion.token_ids),
                      "cache_read_input_tokens": final.num_cached_tokens, "cache_creation_input_tokens": 0}})

    async def _stream(self, request_id: str, model: str, plan: ChatPlan, stream: RequestStream,
                      num_prompt_tokens: int) -> AsyncIterator[str]:
        start = {"id": request_id, "type": "message", "role": "assistant", "model": model, "content": [],
                 "stop_reason": None, "stop_sequence": None,
                 "usage": {"input_tokens": num_prompt_tokens, "output_tokens": 0}}
        yield _event("message_start", {"type": "message_start", "message": start})
        yield _event("ping", {"type": "ping"})
        turn, blocks, output_tokens = AssistantTurn.for_plan(plan), ContentBlocks(), 0
        try:
            for item in blocks.feed(turn.prefix_events):
                yield item
            async for output in stream:  # deltas
                completion = output.outputs[0]
                output_tokens += len(completion.token_ids)
                events = turn.feed(completion.text)
                if completion.finish_reason is not None:
                    events += turn.finish()
                for item in blocks.feed(events):
                    yield item
                if completion.finish_reason is not None:
                    for item in blocks.close():
                        yield item
                    reason, stop_sequence = ap.stop_reason(completion.finish_reason, completion.stop_reason,
                                                           blocks.called_tools)
                    yield _event("message_delta", {"type": "message_delta",
                                                   "delta": {"stop_reason": reason, "stop_sequence": stop_sequence},
                                                   "usage": {"output_tokens": output_tokens}})
                    yield _event("message_stop", {"type": "message_stop"})
        except Exception as e:  # the stream has started: end it with an error event, never a cut connection
            if isinstance(e, EngineError):
                logger.error("request %s failed: %s", request_id, e)
                message = str(e)
            else:
                logger.exception("request %s failed while streaming", request_id)
                message = f"internal server error: {type(e).__name__}"
            yield _event("error", ap.anthropic_error(500, message))
        finally:
            if not stream.finished:
                self.engine.abort(request_id)
