"""The inference engine: paged KV cache, continuous batching, sampling, MTP speculative decoding."""

from glm45.engine.engine import LLMEngine
from glm45.engine.llm import LLM, ChatResult
from glm45.engine.lora import LoRARequest
from glm45.engine.sampling_params import SamplingParams
from glm45.engine.sequence import CompletionOutput, RequestOutput

__all__ = ["LLM", "ChatResult", "CompletionOutput", "LLMEngine", "LoRARequest", "RequestOutput", "SamplingParams"]
