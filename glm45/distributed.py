"""Process groups for tensor and expert parallelism: how the ranks of one model find each other.

glm45 uses torch.distributed and its launchers, nothing home-made. Two ways in:

- spawned: `LLMEngine` with `tensor_parallel_size=N` starts N-1 worker processes on this machine and the
  N processes rendezvous over TCP on 127.0.0.1 (`init_distributed(rank, world_size, init_method=...)`);
- torchrun: every process reads RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT from the environment
  (`init_distributed()` with no arguments), on one machine or many.

The data plane (activations: all-reduce, all-gather) runs on NCCL for CUDA tensors and gloo for CPU tensors.
The control plane (rank 0 telling the workers what to compute next) is a separate gloo group with a very long
timeout, because workers legitimately wait there for as long as the server is idle; the data plane has a
finite timeout, so a rank that stops answering in the middle of a step ends in an error, not a hang.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT = timedelta(seconds=600)  # the longest one rank may wait for the others inside a step
IDLE_TIMEOUT = timedelta(days=3650)          # workers waiting for rank 0's next command
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class ParallelGroup:
    """The ranks that share one model: collectives over them and this process's place among them."""

    group: dist.ProcessGroup | None  # None: a group of one, every collective is the identity
    rank: int = 0
    size: int = 1

    @classmethod
    def single(cls) -> ParallelGroup:
        return cls(None, 0, 1)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks, in place; returns x."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's x concatenated along `dim`, in rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a spawned rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_for(device: torch.device) -> str:
    """gloo for CPU tensors; NCCL for CUDA tensors, with gloo beside it for CPU-side collectives."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init_distributed(
    device: torch.device,
    rank: int | None = None,
    world_size: int | None = None,
    init_method: str | None = None,
    timeout: timedelta = COLLECTIVE_TIMEOUT,
) -> tuple[ParallelGroup, dist.ProcessGroup]:
    """Join the world of ranks; returns (the data-plane group over all ranks, the control-plane gloo group).

    Without rank/world_size/init_method the torchrun environment variables are used."""
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process; one parallel engine "
                           "(or training run) per process")
    if rank is None or world_size is None:
        if not launched_by_torchrun():
            missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
            raise ValueError(f"no rank/world size given and not launched by torchrun (missing {missing})")
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        init_method = init_method or "env://"
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside the world of {world_size} processes")
    if device.type == "cuda":  # NCCL and every kernel without an explicit device use the current one
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timeout, device_id=device if device.type == "cuda" else None)
    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    logger.info("rank %d of %d joined (%s)", rank, world_size, backend_for(device))
    return ParallelGroup(dist.group.WORLD, rank, world_size), control


def local_rank() -> int:
    """This process's index on its machine (torchrun sets LOCAL_RANK; spawned ranks are all local)."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
