"""Shared test setup: the CPU here has 2 cores, so torch runs on one thread and tests stay fast."""

import torch

torch.set_num_threads(1)
