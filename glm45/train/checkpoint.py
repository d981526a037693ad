"""What a training run writes: resumable checkpoints (weights, optimizer, step, and whatever else the loop needs to
continue, such as the data position or a frozen reference model) and the tokenizer files beside the result.

A single process (or LoRA's replicated ranks) writes one `state.pt` from rank 0. Under FSDP every rank writes its
own shards with `torch.distributed.checkpoint` into `sharded/` (model and optimizer state keyed by parameter
name, so a run can resume on another number of ranks), and rank 0 writes the step and settings to `trainer.json`.
Both are written to a temporary name first and renamed: a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
STATE_FILE = "state.pt"
SHARDED_DIR = "sharded"
SHARDED_META = "trainer.json"


def save_checkpoint(folder: Path, model, optimizer, step: int, config, extra: dict | None = None) -> None:
    """Weights, optimizer state, step, settings and `extra`, written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{STATE_FILE}.tmp"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "config": dataclasses.asdict(config), "extra": extra or {}}, tmp)
    tmp.replace(folder / STATE_FILE)


def load_checkpoint(folder: Path, model, optimizer) -> tuple[int, dict] | None:
    """Restore a checkpoint written by `save_checkpoint`; returns (step, extra), or None when there is none."""
    path = folder / STATE_FILE
    if not path.is_file():
        if (folder / SHARDED_DIR).is_dir():
            raise ValueError(f"{folder} holds a sharded (FSDP) checkpoint; resume it under torchrun with full "
                             "fine-tuning on several ranks")
        return None
    state = torch.load(path, weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return state["step"], state.get("extra", {})


def _sharded_state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer.optimizers)
    return {"model": model_state, "optim": optim_state}


def save_sharded(folder: Path, model, optimizer, step: int, config, extra: dict | None = None) -> None:
    """Every rank writes its shards of the model and optimizer state (a collective); rank 0 the step and settings.
    `extra` holds plain values (JSON), the same on every rank."""
    import torch.distributed.checkpoint as dcp

    folder.mkdir(parents=True, exist_ok=True)
    tmp, final = folder / f"{SHARDED_DIR}.tmp", folder / SHARDED_DIR
    if dist.get_rank() == 0 and tmp.exists():
        shutil.rmtree(tmp)
    dist.barrier()
    dcp.save(_sharded_state(model, optimizer), checkpoint_id=str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        meta = {"step": step, "world_size": dist.get_world_size(), "config": dataclasses.asdict(config),
                "extra": extra or {}}
        (folder / f"{SHARDED_META}.tmp").write_text(json.dumps(meta, indent=2) + "\n")
        (folder / f"{SHARDED_META}.tmp").replace(folder / SHARDED_META)
    dist.barrier()


def load_sharded(folder: Path, model, optimizer) -> tuple[int, dict] | None:
    """Restore a sharded checkpoint into the (already sharded) model and optimizer; (step, extra) or None."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    if not (folder / SHARDED_META).is_file():
        if (folder / STATE_FILE).is_file():
            raise ValueError(f"{folder} holds a single-process checkpoint ({STATE_FILE}); resume it without "
                             "torchrun, or with LoRA")
        return None
    meta = json.loads((folder / SHARDED_META).read_text())
    state = _sharded_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(folder / SHARDED_DIR))
    set_state_dict(model, optimizer.optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return meta["step"], meta.get("extra", {})


def copy_tokenizer(source: str | Path, dest: Path) -> None:
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copy(Path(source) / name, dest / name)
