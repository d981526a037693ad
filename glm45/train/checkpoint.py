"""What a training run writes: resumable checkpoints (weights, optimizer, step) and the final result — the
model in the HF layout with its tokenizer files, or a LoRA adapter in the PEFT layout."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
STATE_FILE = "state.pt"


def save_checkpoint(folder: Path, model, optimizer, step: int, config) -> None:
    """Weights, optimizer state, step and settings, written atomically (a crash never leaves half a file)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{STATE_FILE}.tmp"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "config": dataclasses.asdict(config)}, tmp)
    tmp.replace(folder / STATE_FILE)


def load_checkpoint(folder: Path, model, optimizer) -> int | None:
    """Restore a checkpoint written by `save_checkpoint`; returns its step, or None when there is none."""
    path = folder / STATE_FILE
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return state["step"]


def copy_tokenizer(source: str | Path, dest: Path) -> None:
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copy(Path(source) / name, dest / name)
