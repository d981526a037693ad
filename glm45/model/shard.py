"""`ShardSpec`: which part of a full tensor one rank keeps (tensor and expert parallelism).

A leaf module: the loader cuts checkpoint tensors with it, and `glm45.parallel` produces it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ShardSpec:
    """The part of a full tensor that one rank keeps.

    Along `dim` the tensor is `parts` equal blocks laid end to end (2 for a fused gate/up stack: gate rows,
    then up rows); each block is cut into `num_shards` equal pieces and the rank keeps piece `index` of every
    block, in block order. With parts=1 that is simply the index-th of num_shards equal slices.

    `pad` (one block only, for vocabularies that ranks do not divide): every piece is ⌈size / num_shards⌉
    long, the last ones are cut short by the end of the tensor and padded with zeros to that length.
    """

    dim: int
    num_shards: int
    index: int
    parts: int = 1
    pad: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.num_shards:
            raise ValueError(f"shard index {self.index} is outside [0, {self.num_shards})")
        if self.pad and self.parts != 1:
            raise ValueError("a padded shard has one block")

    def piece_length(self, size: int) -> int:
        return -(-size // self.num_shards) if self.pad else size // (self.parts * self.num_shards)

    def ranges(self, size: int) -> list[tuple[int, int]]:
        """(start, length) of each kept piece along `dim` of a full tensor that is `size` long there."""
        if self.pad:
            start = min(self.index * self.piece_length(size), size)
            return [(start, min(self.piece_length(size), size - start))]
        if size % (self.parts * self.num_shards):
            raise ValueError(f"a dimension of size {size} cannot be split into {self.parts} × {self.num_shards} "
                             "equal pieces")
        block = size // self.parts
        piece = block // self.num_shards
        return [(p * block + self.index * piece, piece) for p in range(self.parts)]

    def local_shape(self, full_shape: list[int] | torch.Size) -> list[int]:
        shape = list(full_shape)
        shape[self.dim] = self.piece_length(shape[self.dim]) * self.parts
        return shape

    def full_shape(self, local_shape: list[int] | torch.Size) -> list[int]:
        if self.pad:
            raise ValueError("the full shape of a padded shard is ambiguous")
        shape = list(local_shape)
        shape[self.dim] *= self.num_shards
        return shape

    def slice(self, tensor: torch.Tensor) -> torch.Tensor:
        """The kept part of a full tensor: a view when it is one whole piece, else a new tensor."""
        size = tensor.shape[self.dim]
        pieces = [tensor.narrow(self.dim, start, length) for start, length in self.ranges(size)]
        missing = self.piece_length(size) - pieces[0].shape[self.dim] if self.pad else 0
        if missing:
            shape = list(tensor.shape)
            shape[self.dim] = missing
            pieces.append(tensor.new_zeros(shape))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=self.dim)


ShardPlan = Mapping[str, ShardSpec]  # model parameter name → its shard on this rank
