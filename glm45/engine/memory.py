"""What the engine holds in memory: the weights by part and format, and the KV cache; logged at startup and
exported on /metrics (`glm45:weight_bytes`, `glm45:kv_cache_bytes`). The same parts as `glm45 plan`, but
measured on the loaded tensors rather than estimated from the config."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glm45.model.state_dict import checkpoint_name
from glm45.plan.accounting import LABELS
from glm45.plan.sources import part_of


@dataclass
class MemoryReport:
    weight_bytes: int
    weight_parts: dict[str, int]
    kv_cache_bytes: int
    kv_bytes_per_token: int

    def describe(self) -> str:
        parts = ", ".join(f"{LABELS.get(name, name)} {size / 2**20:.1f}" for name, size in self.weight_parts.items()
                          if size)
        return (f"weights {self.weight_bytes / 2**20:.1f} MiB ({parts}); KV cache {self.kv_cache_bytes / 2**20:.1f} "
                f"MiB, {self.kv_bytes_per_token:,} bytes per token")


def memory_report(model, kv_cache: torch.Tensor, block_size: int) -> MemoryReport:
    parts: dict[str, int] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        part = part_of(checkpoint_name(name, model.config), model.config)
        parts[part] = parts.get(part, 0) + tensor.numel() * tensor.element_size()
    kv_bytes = kv_cache.numel() * kv_cache.element_size()
    layers, _, blocks = kv_cache.shape[:3]
    return MemoryReport(sum(parts.values()), parts, kv_bytes, kv_bytes // (blocks * block_size))
