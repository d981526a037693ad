"""The offline API, in vLLM's shape: `LLM(model=...).generate(prompts, params)` and `.chat(messages, ...)`.

`generate` submits every prompt at once and steps the engine until all are done, so they are batched
continuously; outputs come back in the order of the prompts. `chat` renders conversations with the
GLM-4.5 template and parses each answer into reasoning, content and tool calls.

With tensor parallelism an `LLM` holds worker processes and the process group: `shutdown()` (or `with LLM(...)
as llm:`, or dropping the last reference) releases them, after which another parallel `LLM` can start.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from tqdm.auto import tqdm

from glm45.config import EngineConfig
from glm45.engine.engine import LLMEngine
from glm45.engine.lora import LoRARequest
from glm45.engine.sampling_params import RequestOutputKind, SamplingParams
from glm45.engine.sequence import RequestOutput

PromptType = str | Mapping[str, Any]


@dataclasses.dataclass
class ChatResult:
    """One parsed chat answer beside its raw completion."""

    reasoning_content: str | None
    content: str | None
    tool_calls: list[dict[str, Any]]
    finish_reason: str | None
    output: RequestOutput


class LLM:
    def __init__(self, model: str | None = None, **engine_args: Any):
        names = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(engine_args) - names)
        if unknown:
            raise ValueError(f"unknown engine arguments {unknown}; allowed: {sorted(names - {'model'})}")
        self.engine = LLMEngine(EngineConfig(model=model, **engine_args))
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers and leave the process group (idempotent)."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt, batched together. `lora_request`: one `LoRARequest` for all prompts or one per
        prompt (None: the base model); needs `LLM(..., enable_lora=True)`."""
        if isinstance(prompts, (str, Mapping)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        if lora_request is None or isinstance(lora_request, LoRARequest):
            loras = [lora_request] * len(prompts)
        else:
            loras = list(lora_request)
            if len(loras) != len(prompts):
                raise ValueError(f"got {len(loras)} LoRA requests for {len(prompts)} prompts")
        request_ids = []
        try:
            for prompt, p, lora in zip(prompts, params, loras, strict=True):
                request_id = f"offline-{next(self._ids)}"
                # only the finished output is returned: none is built before (vLLM's LLM does the same)
                p = dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY)
                self.engine.add_request(request_id, self._prompt(prompt), p, lora_request=lora)
                request_ids.append(request_id)
            return self._run(request_ids, use_tqdm)
        finally:  # on any failure (or Ctrl-C) leave nothing of this call in the engine
            for request_id in request_ids:
                self.engine.abort_request(request_id)

    @staticmethod
    def _prompt(prompt: PromptType) -> str | list[int]:
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, Mapping):
            if "prompt_token_ids" in prompt:
                return list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return str(prompt["prompt"])
        raise ValueError(
            f"a prompt must be a string, {{'prompt': str}} or {{'prompt_token_ids': [...]}}, got {prompt!r:.80}"
        )

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(request_ids), desc="Generating", unit="req", disable=not use_tqdm,
                  leave=False) as bar:
            while len(finished) < len(request_ids):
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        bar.update(1)
        return [finished[request_id] for request_id in request_ids]

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        sampling_params: SamplingParams | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        enable_thinking: bool = True,
        use_tqdm: bool = True,
        tool_choice: str | Mapping[str, Any] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[ChatResult]:
        """Answer one conversation or a list of them; each answer parsed into reasoning, content and tool calls.
        `tool_choice` and `chat_template_kwargs` mean what they mean on the server (`glm45.chat.plan_chat`), tool
        calls included: decoded by their grammar unless `sampling_params` brings its own `structured_outputs`."""
        from glm45.chat import assemble_turn, plan_chat

        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer, and this model folder has none")
        conversations = [messages] if messages and isinstance(messages[0], Mapping) else list(messages)
        plans = [plan_chat(c, tools, tool_choice, template_kwargs=chat_template_kwargs,
                           default_template_kwargs={"enable_thinking": enable_thinking}) for c in conversations]
        params = sampling_params or SamplingParams()
        if params.structured_outputs is None:  # tool calls decoded by their grammar, as the server does
            params = [dataclasses.replace(params, structured_outputs=plan.structured_outputs()) for plan in plans]
        outputs = self.generate([plan.prompt for plan in plans], params, use_tqdm=use_tqdm)
        results = []
        for plan, output in zip(plans, outputs, strict=True):
            completion = output.outputs[0]
            turn = assemble_turn(completion.text, plan)
            calls = [{"name": call.name, "arguments": call.parsed_arguments()} for call in turn.tool_calls]
            finish = "tool_calls" if calls else completion.finish_reason
            results.append(ChatResult(turn.reasoning, turn.content, calls, finish, output))
        return results
