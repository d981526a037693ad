"""The bf16 CPU linear paths agree with a float32 reference, and stay out of autograd."""

import pytest
import torch
import torch.nn.functional as F

from glm45.kernels import cpu

needs_kernel = pytest.mark.skipif(cpu._library() is None, reason="no C compiler or no AVX2 on this CPU")


def reference(x, w, bias=None):
    y = F.linear(x.float(), w.float(), None if bias is None else bias.float())
    return y


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_gemv_kernel_matches_float32(rows):
    torch.manual_seed(rows)
    w = torch.randn(300, 96).bfloat16()
    x = torch.randn(rows, 96).bfloat16()
    bias = torch.randn(300).bfloat16()
    got = cpu.linear(x, w, bias)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 300)
    # the only rounding is of the fp32 result to bf16
    assert torch.allclose(got.float(), reference(x, w, bias), rtol=2**-8, atol=1e-3)


def test_upcast_path_for_many_rows_matches_float32():
    torch.manual_seed(0)
    w = torch.randn(1100, 64).bfloat16()  # more rows than one upcast chunk
    x = torch.randn(2, 7, 64).bfloat16()
    got = cpu.linear(x, w)
    assert got.shape == (2, 7, 1100)
    assert torch.allclose(got.float(), reference(x, w), rtol=2**-8, atol=1e-3)


@needs_kernel
def test_grouped_gemv_matches_per_expert_products():
    torch.manual_seed(1)
    stack = torch.randn(5, 40, 32).bfloat16()
    x = torch.randn(6, 32).bfloat16()
    experts = torch.tensor([0, 0, 3, 4, 1, 3])
    got = cpu.grouped_gemv(x, stack, experts)
    expected = torch.stack([reference(x[r:r + 1], stack[e])[0] for r, e in enumerate(experts.tolist())])
    assert torch.allclose(got.float(), expected, rtol=2**-8, atol=1e-3)


def test_fallbacks_keep_torch_semantics():
    w = torch.randn(8, 24).bfloat16()  # 24 is not a multiple of 16: torch's kernel
    x = torch.randn(1, 24).bfloat16()
    assert torch.equal(cpu.linear(x, w), F.linear(x, w))
    w32, x32 = w.float().requires_grad_(), x.float()
    y = cpu.linear(x32, w32)  # float32 and autograd: plain F.linear, gradients flow
    y.sum().backward()
    assert w32.grad is not None
    wb = torch.randn(16, 32, dtype=torch.bfloat16, requires_grad=True)
    cpu.linear(torch.randn(1, 32, dtype=torch.bfloat16), wb).sum().backward()
    assert wb.grad is not None
