"""The captured CPU step's program: the ops of `csrc/program.c` (their kinds and the C `Op` struct), a list of them
that keeps alive every tensor it points at and runs in one call, and the weight descriptors its matrix ops take.
`cpu_step_programs.py` builds such programs for a model's decode step."""

from __future__ import annotations

import ctypes

import torch

from glm45.kernels import cpu

(OP_EMBED, OP_RMSNORM, OP_QUANT, OP_LINEAR, OP_QK_ROPE, OP_ATTN, OP_SILU_MUL, OP_ROUTER, OP_GROUPED, OP_COMBINE,
 OP_GATHER, OP_LORA, OP_VERIFY, OP_DRAFT, OP_MASK, OP_ADVANCE, OP_ADVANCE_DRAFT) = range(1, 18)
KV_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float8_e4m3fn: 2}


class Op(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int64), ("p", ctypes.c_void_p * 16), ("n", ctypes.c_int64 * 16),
                ("f", ctypes.c_float * 4)]


class Program:
    """A list of ops and everything they point at (kept alive with them)."""

    def __init__(self):
        self.ops: list[Op] = []
        self.keep: list = []
        self.array = None

    def ptr(self, t) -> int | None:
        if t is None:
            return None
        if isinstance(t, torch.Tensor):
            self.keep.append(t)
            return t.data_ptr()
        self.keep.append(t)
        return ctypes.addressof(t)

    def add(self, kind: int, p=(), n=(), f=()) -> Op:
        op = Op()
        op.kind = kind
        for i, value in enumerate(p):
            op.p[i] = self.ptr(value)
        for i, value in enumerate(n):
            op.n[i] = int(value)
        for i, value in enumerate(f):
            op.f[i] = float(value)
        self.ops.append(op)
        return op

    def finish(self) -> None:
        self.array = (Op * len(self.ops))(*self.ops)

    def run(self, rounding: bool, threads: int) -> None:
        cpu.library().glm45_run_program(self.array, len(self.ops), int(rounding), threads)

    def run_steps(self, steps: int, run: torch.Tensor, run_end: torch.Tensor, rounding: bool, threads: int) -> int:
        """The program up to `steps` times in one call: `run` (int64 [2]) holds the step's index for its ops and the
        number of live rows, and the run ends early once those rows of `run_end` are done (`StepBuffers.run_end`).
        → the steps run."""
        return cpu.library().glm45_run_steps(self.array, len(self.ops), steps, run.data_ptr(), run_end.data_ptr(),
                                             int(rounding), threads)


def linear_weight(module):
    """(descriptor source, fp32 bias) of a Linear or QuantLinear."""
    packed = getattr(module, "packed", None)
    return (packed if packed is not None else module.weight), (
        None if module.bias is None else module.bias.detach().float().contiguous())


def describe(program: Program, weight, bias=None) -> cpu.Weight:
    """The C descriptor of a weight (plain or packed) and its bias, both kept alive by the program."""
    if isinstance(weight, torch.Tensor):
        weight = weight.detach().contiguous()
        program.keep.append(weight)
    else:
        program.keep.append(weight)
    if bias is not None:
        program.keep.append(bias)
    descriptor = cpu.describe(weight, bias)
    if descriptor is None:
        raise ValueError(f"the CPU kernels do not take a {type(weight).__name__} of dtype "
                         f"{getattr(weight, 'dtype', None)}")
    return descriptor


def as_f32(t: torch.Tensor) -> torch.Tensor:
    """A contiguous float32 copy (norm weights, router weights: what the ops read as fp32)."""
    return t.detach().float().contiguous()
