"""Will a model fit? Its bytes on one device, counted on the meta-device model before any weight is allocated,
against the memory the device has: on CPU what the OS reports available, on CUDA the device's free memory.
A model that cannot fit is refused with both numbers (`ModelTooLarge`), not discovered by the OS killing us.
Weights held packed (`--quantization`) count at their packed width, scales left out: the count is a lower
bound, so a refusal is certain."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from glm45.model.state_dict import FLOAT32_PARAMS
from glm45.quant.scheme import tensor_format

PACKED_BYTES = {"fp8": 1.0, "int8": 1.0, "int4": 0.5}  # per weight element, scales aside

logger = logging.getLogger(__name__)


class ModelTooLarge(ValueError):
    """The model's weights need more memory than the device has."""


def model_bytes(model: torch.nn.Module, dtype: torch.dtype, fmt: str | None = None,
                head_fmt: str | None = None) -> int:
    """Bytes of the (meta) model's parameters and buffers once loaded in `dtype` (routers and the like in fp32),
    the weights packed in format `fmt` (the LM heads in `head_fmt`) at its width."""
    total = 0.0
    for name, tensor in model.state_dict().items():
        if (packed := tensor_format(name, fmt, head_fmt)) in PACKED_BYTES:
            size = PACKED_BYTES[packed]
        elif not tensor.is_floating_point():
            size = tensor.element_size()
        else:
            size = torch.float32.itemsize if FLOAT32_PARAMS.match(name) else dtype.itemsize
        total += tensor.numel() * size
    return int(total)


def available_bytes(device: torch.device) -> int | None:
    """Memory free for the weights on `device`, or None when it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(model: torch.nn.Module, dtype: torch.dtype, device: torch.device, path: str | Path,
               fmt: str | None = None, head_fmt: str | None = None) -> None:
    """Raise `ModelTooLarge` when the (meta, possibly sharded) model cannot be loaded on `device`."""
    needed = model_bytes(model, dtype, fmt, head_fmt)
    available = available_bytes(device)
    if available is not None and needed > available:
        name = str(dtype).removeprefix("torch.")
        name += f" ({fmt} weights)" if fmt else ""
        raise ModelTooLarge(f"{path} needs {needed / 2**30:.2f} GiB for its weights in {name} on {device}, but only "
                            f"{available / 2**30:.2f} GiB are available")
    logger.debug("%s: %.2f GiB of weights, %s available", path, needed / 2**30,
                 "unknown" if available is None else f"{available / 2**30:.2f} GiB")
