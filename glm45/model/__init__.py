"""The GLM-4.5 model: architecture, MTP layer and checkpoint loading."""

from glm45.config import ModelConfig
from glm45.model.glm4_moe import Glm4MoeForCausalLM

__all__ = ["Glm4MoeForCausalLM", "ModelConfig"]
