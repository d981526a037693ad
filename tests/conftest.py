"""Shared test setup: the CPU here has 2 cores, so torch runs on one thread and tests stay fast. The bundled
model's recipe (`recipes/glm45-tiny`, not part of the package) is importable as `glm45_tiny`."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes" / "glm45-tiny"))
from tiny_checkpoints import TINY_CONFIGS, save_reference

torch.set_num_threads(1)


@pytest.fixture(scope="session", params=list(TINY_CONFIGS))
def tiny_checkpoint(request, tmp_path_factory):
    """(kind, folder) for each tiny reference checkpoint, written once per test session."""
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, save_reference(request.param, folder)
