"""Tensor-parallel serving: N processes run the model in lock-step, rank 0 also runs the engine.

The scheduler, the sequences and the sampler exist once, on rank 0. Each step rank 0 sends the plain inputs
of each model call (token ids, positions, slot mapping, per-sequence attention slices, logit rows) to the
other ranks over the control group (a block table the workers already hold travels as its new entries only,
`BlockTableMirror`), then every rank runs the same call on its shard of the model and of
the KV cache (its own KV heads); the model's all-reduces and all-gathers keep them in lock-step, and only
rank 0 uses the logits.

Two ways to get the ranks:
- spawned (the default): `LLMEngine` starts N-1 worker processes on this machine (torch.multiprocessing,
  spawn) and they rendezvous over 127.0.0.1. CUDA needs N visible devices, else a ValueError says so.
- torchrun: every process runs the same command (`torchrun --nproc-per-node … -m glm45.cli serve …`).
  Rank 0 returns from `LLMEngine(...)` and serves; on every other rank `LLMEngine(...)` serves model
  steps for rank 0 until it shuts down, and then exits the process.

Failure: a spawned worker that dies is noticed by a watcher thread at once (logged with its exit code);
the next model call, or the collective in flight, fails with `WorkerError` instead of waiting; and the
engine refuses every later step. Collectives inside a step time out (distributed.COLLECTIVE_TIMEOUT)
rather than hang where no peer disconnects (NCCL); under torchrun the launcher tears the job down.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import threading
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import wait as wait_for_sentinels
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from glm45.config import EngineConfig
from glm45.distributed import (
    ParallelGroup,
    destroy_distributed,
    free_port,
    init_distributed,
    launched_by_torchrun,
    local_rank,
)
from glm45.engine.attention import StepInputs
from glm45.engine.device import resolve_device
from glm45.engine.model_runner import ModelRunner, local_kv_heads
from glm45.model import Glm4MoeForCausalLM
from glm45.parallel.tensor_parallel import parallelize_model

logger = logging.getLogger(__name__)

COMMANDS = ("forward", "logits", "draft")  # the model-runner calls that rank 0 may ask the workers to run
JOIN_TIMEOUT_S = 30.0


class WorkerError(RuntimeError):
    """A tensor-parallel rank is gone; the engine cannot continue and must be restarted."""


def rank_device(config: EngineConfig, rank_on_machine: int) -> torch.device:
    """The device of one rank: CPU, or the CUDA device with the rank's index on this machine."""
    device = resolve_device(config.device)
    if device.type != "cuda":
        return device
    available = torch.cuda.device_count()
    if rank_on_machine >= available:
        raise ValueError(f"tensor_parallel_size={config.tensor_parallel_size} needs a CUDA device per rank on this "
                         f"machine, but only {available} are visible (CUDA_VISIBLE_DEVICES); lower "
                         "--tensor-parallel-size or run on a machine with more GPUs")
    return torch.device("cuda", rank_on_machine)


def load_shard(config: EngineConfig, model_path: Path, group: ParallelGroup, device: torch.device):
    """This rank's shard of the model, read shard by shard from the checkpoint."""
    return Glm4MoeForCausalLM.from_pretrained(
        model_path, dtype=config.dtype, device=device, load_mtp=config.num_speculative_tokens > 0,
        progress=group.rank == 0, quantization=config.quantization,
        lm_head_quantization=config.lm_head_quantization, share_mtp_copies=True,
        parallelize=functools.partial(parallelize_model, group=group, expert_parallel=config.enable_expert_parallel))


@dataclass
class TableDelta:
    """A block table on the wire: the first `kept` entries of the table the worker holds for the sequence, then
    `appended`."""

    kept: int
    appended: list[int]


class BlockTableMirror:
    """The block tables the workers hold, kept alike on rank 0 (`encode`) and on every worker (`decode`), so a step
    sends each sequence's new blocks instead of its whole table (at 32k tokens, 2,048 entries per sequence). A table
    is remembered while its sequence takes part in the steps: a `forward` call forgets every sequence it does not
    include, a `draft` call only adds. A table that is not an extension of the remembered one goes whole."""

    def __init__(self):
        self.known: dict[int, list[int]] = {}

    def encode(self, inputs: StepInputs, forget_others: bool) -> StepInputs:
        slices = []
        for s in inputs.slices:
            known = self.known.get(s.seq_id)
            table = s.block_table
            kept = len(known) if known and len(known) <= len(table) and table[:len(known)] == known else 0
            slices.append(replace(s, block_table=TableDelta(kept, table[kept:])))
        self._remember(inputs.slices, forget_others)
        return replace(inputs, slices=slices)

    def decode(self, inputs: StepInputs, forget_others: bool) -> StepInputs:
        slices = [replace(s, block_table=self.known[s.seq_id][:s.block_table.kept] + s.block_table.appended)
                  if s.block_table.kept else replace(s, block_table=s.block_table.appended) for s in inputs.slices]
        self._remember(slices, forget_others)
        return replace(inputs, slices=slices)

    def _remember(self, slices: list, forget_others: bool) -> None:
        tables = {s.seq_id: list(s.block_table) for s in slices if s.seq_id >= 0}
        self.known = tables if forget_others else {**self.known, **tables}


def _broadcast(control: dist.ProcessGroup, message=None):
    """Rank 0's `message` on every rank of the control group (plain Python objects, pickled)."""
    box = [message]
    dist.broadcast_object_list(box, src=0, group=control)
    return box[0]


# ---------------------------------------------------------------------- the worker side
def serve_steps(config: EngineConfig, model_path: Path, group: ParallelGroup, control: dist.ProcessGroup,
                device: torch.device) -> None:
    """A worker rank's life: load the shard, allocate the KV cache rank 0 sized, run its calls until told to stop."""
    model = load_shard(config, model_path, group, device)
    start = _broadcast(control)
    if start is None:  # rank 0 gave up before serving (its own load or sizing failed)
        return
    num_blocks, num_cache_layers = start
    runner = ModelRunner.create(model, num_blocks, num_cache_layers, config.block_size, config.kv_cache_dtype)
    logger.info("rank %d serving: %d KV blocks of its %d KV heads", group.rank, num_blocks, local_kv_heads(model))
    tables = BlockTableMirror()
    while (command := _broadcast(control)) is not None:
        name, args = command
        if name not in COMMANDS:
            raise RuntimeError(f"rank 0 sent an unknown command {name!r}")
        if name != "logits":
            args = (tables.decode(args[0], forget_others=name == "forward"), *args[1:])
        getattr(runner, name)(*args)


def _spawned_worker(rank: int, world_size: int, init_method: str, config: EngineConfig, model_path: Path,
                    num_threads: int) -> None:
    logging.basicConfig(level=logging.WARNING,
                        format=f"%(asctime)s %(levelname)s [tp rank {rank}] %(name)s: %(message)s")
    torch.set_num_threads(num_threads)
    device = rank_device(config, rank)
    group, control = init_distributed(device, rank, world_size, init_method)
    try:
        serve_steps(config, model_path, group, control, device)
    finally:
        destroy_distributed()


# ---------------------------------------------------------------------- rank 0
class WorkerGroup:
    """Rank 0's handle on the other ranks: their processes (when spawned), the groups, the watcher."""

    def __init__(self, config: EngineConfig, group: ParallelGroup, control: dist.ProcessGroup, device: torch.device,
                 processes: list | None = None):
        self.config = config
        self.group = group
        self.control = control
        self.device = device
        self.processes = processes or []  # spawned workers, rank i + 1 at index i
        self.failure: WorkerError | None = None
        self.closed = False
        self._stopping = threading.Event()
        if self.processes:
            threading.Thread(target=self._watch, name="glm45-tp-watcher", daemon=True).start()
        atexit.register(self.shutdown)

    @classmethod
    def start(cls, config: EngineConfig, model_path: Path) -> WorkerGroup:
        """Spawn (or, under torchrun, join) the ranks. On torchrun ranks other than 0 this serves model steps
        for rank 0 and then exits the process; it only returns on rank 0."""
        size = config.tensor_parallel_size
        if launched_by_torchrun():
            return cls._join_torchrun(config, model_path)
        rank_device(config, size - 1)  # raises unless every rank has its device
        device = rank_device(config, 0)
        init_method = f"tcp://127.0.0.1:{free_port()}"
        context = mp.get_context("spawn")
        processes = [
            context.Process(target=_spawned_worker, name=f"glm45-tp-rank-{rank}", daemon=True,
                            args=(rank, size, init_method, config, model_path, torch.get_num_threads()))
            for rank in range(1, size)
        ]
        for process in processes:
            process.start()
        logger.info("started %d tensor-parallel workers (pids %s)", len(processes), [p.pid for p in processes])
        try:
            group, control = init_distributed(device, 0, size, init_method)
        except BaseException:
            for process in processes:
                process.terminate()
            raise
        return cls(config, group, control, device, processes)

    @classmethod
    def _join_torchrun(cls, config: EngineConfig, model_path: Path) -> WorkerGroup:
        world_size = int(os.environ["WORLD_SIZE"])
        if world_size != config.tensor_parallel_size:
            raise ValueError(f"torchrun started {world_size} processes but tensor_parallel_size is "
                             f"{config.tensor_parallel_size}; they must be equal (nnodes × nproc-per-node)")
        device = rank_device(config, local_rank())
        group, control = init_distributed(device)
        if group.rank == 0:
            return cls(config, group, control, device)
        try:
            serve_steps(config, model_path, group, control, device)
        finally:
            destroy_distributed()
        raise SystemExit(0)

    def parallelize(self, model) -> dict:
        return parallelize_model(model, self.group, self.config.enable_expert_parallel)

    def runner(self, model, num_blocks: int, num_cache_layers: int) -> DistributedModelRunner:
        """Tell the workers to allocate their KV caches like rank 0's, and return rank 0's model runner."""
        self.check()
        try:
            _broadcast(self.control, (num_blocks, num_cache_layers))
        except Exception as e:
            raise self.fail(e) from e
        local = ModelRunner.create(model, num_blocks, num_cache_layers, self.config.block_size,
                                   self.config.kv_cache_dtype)
        return DistributedModelRunner(model, local.kv_cache, self.config.block_size, self)

    # ------------------------------------------------------------------ failure
    def _watch(self) -> None:
        ready = wait_for_sentinels([p.sentinel for p in self.processes])
        if self._stopping.is_set():
            return
        for rank, process in enumerate(self.processes, start=1):
            if process.sentinel in ready:
                process.join(1.0)
                logger.error("tensor-parallel worker rank %d (pid %d) exited with code %s; the engine will fail "
                             "its next step", rank, process.pid, process.exitcode)

    def _dead_workers(self) -> str:
        # A process's sentinel is readable once it has exited, whoever reaps it. `is_alive()` is not enough:
        # while the watcher thread reaps a worker, a concurrent poll here sees ECHILD and reports it alive.
        ready = set(wait_for_sentinels([p.sentinel for p in self.processes], timeout=0))
        dead = [(rank, p) for rank, p in enumerate(self.processes, start=1) if p.sentinel in ready]
        for _, process in dead:  # its exit code: set by whichever thread reaps it, so wait a moment for it
            deadline = time.monotonic() + 2.0
            while process.exitcode is None and time.monotonic() < deadline:
                process.join(0.05)
        return "; ".join(f"tensor-parallel worker rank {rank} (pid {p.pid}) exited with code {p.exitcode}"
                         for rank, p in dead)

    def check(self) -> None:
        """Raise WorkerError if a rank is known to be gone."""
        if self.failure is not None:
            raise self.failure
        if self.closed:
            raise WorkerError("the tensor-parallel engine was shut down")
        dead = self._dead_workers()
        if dead:
            self.failure = WorkerError(f"{dead}; the engine cannot continue and must be restarted")
            raise self.failure

    def fail(self, error: BaseException) -> WorkerError:
        """The WorkerError for a collective that failed (a peer disconnected or timed out)."""
        dead = self._dead_workers() if self.processes else ""
        reason = dead or f"a collective with the other tensor-parallel ranks failed ({error})"
        self.failure = WorkerError(f"{reason}; the engine cannot continue and must be restarted")
        logger.error("%s", self.failure)
        return self.failure

    def shutdown(self) -> None:
        """Stop the workers (they leave their loop and exit) and leave the process group. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._stopping.set()
        if self.failure is None:
            try:
                _broadcast(self.control, None)
            except Exception as e:  # a worker is already gone: nothing more to tell it
                logger.warning("could not tell the tensor-parallel workers to stop: %s", e)
        for process in self.processes:
            process.join(JOIN_TIMEOUT_S)
            if process.is_alive():
                logger.warning("tensor-parallel worker pid %d did not stop; terminating it", process.pid)
                process.terminate()
                process.join(JOIN_TIMEOUT_S)
        destroy_distributed()
        atexit.unregister(self.shutdown)


class DistributedModelRunner(ModelRunner):
    """Rank 0's model runner: each call goes to the workers first, then runs here on rank 0's shard."""

    def __init__(self, model, kv_cache: torch.Tensor, block_size: int, workers: WorkerGroup):
        super().__init__(model, kv_cache, block_size)
        self.workers = workers
        self.tables = BlockTableMirror()

    def _run(self, name: str, *args):
        self.workers.check()
        try:
            sent = args if name == "logits" else (self.tables.encode(args[0], name == "forward"), *args[1:])
            _broadcast(self.workers.control, (name, sent))
            return getattr(super(), name)(*args)
        except WorkerError:
            raise
        except RuntimeError as e:  # gloo: "Connection closed by peer" …; NCCL: watchdog timeout
            raise self.workers.fail(e) from e

    def forward(self, inputs: StepInputs, logit_rows: list[int]) -> torch.Tensor | None:
        return self._run("forward", inputs, logit_rows)

    def logits(self, rows: list[int]) -> torch.Tensor:
        return self._run("logits", rows)

    def draft(self, inputs: StepInputs, hidden_rows: list[int] | None, logit_rows: list[int]) -> torch.Tensor | None:
        return self._run("draft", inputs, hidden_rows, logit_rows)
