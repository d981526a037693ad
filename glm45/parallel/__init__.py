"""Parallelism applied from outside the single-device model (torchtitan style).

- `tensor_parallel.parallelize_model`: attention heads, MLP columns/rows, vocabulary and (unless expert
  parallel) each expert's intermediate dimension split over the ranks of a group; one all-reduce per
  attention and per feed-forward.
- `expert_parallel`: the routed experts partitioned over the ranks instead.
- `data_parallel.shard_for_training`: FSDP2 for full fine-tuning, replicated weights with averaged
  gradients (DDP) for LoRA.
"""

from glm45.parallel.tensor_parallel import parallelize_model

__all__ = ["parallelize_model"]
