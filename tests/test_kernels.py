"""The CPU kernels against torch references: every weight format, plain and grouped (MoE), for each instruction
set this CPU can run (AVX2, and AVX-512 where present), and their fallbacks keep torch's semantics."""

import ctypes

import pytest
import torch
import torch.nn.functional as F

from glm45.kernels import cpu, prefill
from glm45.quant.packed import PackedWeight, _expand_codes, dequantize, quantize

ISAS = [isa for isa in ("avx2", "avx512")
        if (isa == "avx2" and {"avx2", "fma", "f16c"} <= cpu.cpu_features())
        or (isa == "avx512" and all(f in cpu.cpu_features() for f in cpu.AVX512_FEATURES))]
needs_kernel = pytest.mark.skipif(cpu.library() is None, reason="no C compiler or no AVX2 on this CPU")


@pytest.fixture(params=ISAS or [None])
def isa(request, monkeypatch):
    if request.param is None:
        pytest.skip("this CPU has neither AVX2+FMA+F16C nor AVX-512: the kernels do not run here")
    monkeypatch.setenv("GLM45_CPU_ISA", request.param)
    cpu.library.cache_clear()
    yield request.param
    cpu.library.cache_clear()


def pack(w, fmt):
    """`quantize`, plus "int4/block": int4 in the per-block fp16 layout of checkpoints glm45 wrote before."""
    if fmt != "int4/block":
        return quantize(w, fmt)
    packed = quantize(w, "int4")
    scale, minimum = _expand_codes(packed.scale.float(), packed.minimum.float(), packed.sub_scale, packed.sub_min)
    return PackedWeight("int4", packed.data, scale.half(), minimum.half())


def reference(x, w, bias=None):
    return F.linear(x.float(), w.float(), None if bias is None else bias.float())


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("k", [96, 256, 2048])  # short rows go four weight rows at a time, long ones one by one
def test_bf16_kernel_matches_float32(isa, rows, k):
    assert cpu.library().glm45_isa().decode() == isa
    torch.manual_seed(rows)
    w = torch.randn(301, k).bfloat16()  # 301: a last group of fewer than four weight rows
    x = torch.randn(rows, k).bfloat16()
    bias = torch.randn(301).bfloat16()
    got = cpu.linear(x, w, bias)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 301)
    # the only rounding is of the fp32 result to bf16
    assert torch.allclose(got.float(), reference(x, w, bias), rtol=2**-8, atol=1e-3)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 11, 32, 45, 64])
@pytest.mark.parametrize("k", [80, 1024])  # 80: a last vector of 16 inputs (masked)
def test_bf16_rows_of_a_bf16_model_match_float32(isa, rows, k):
    """The program's products for a bf16 model (activations rounded to bf16, `round` set) at many rows: with
    AVX512-BF16 they are bf16 dot products from two rows (groups of four activation rows, four weight rows a pass, a
    last partial group of each), else the widening path; either way the fp32 sum of the exact products, rounded."""
    torch.manual_seed(rows + k)
    w = torch.randn(301, k).bfloat16()
    x = torch.randn(rows, k).bfloat16().float()
    bias = torch.randn(301)
    got = torch.empty(rows, 301)
    lib = cpu.library()
    lib.glm45_linear(ctypes.byref(cpu.describe(w, bias)), x.data_ptr(), rows, k, got.data_ptr(), 301, 1, 2)
    expected = reference(x, w, bias)
    assert torch.equal(got, got.bfloat16().float())  # rounded to bf16
    assert torch.allclose(got, expected, rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("k", [96, 256, 1024])  # short rows four weight rows a pass, long ones read whole
def test_a_bf16_models_row_comes_out_the_same_alone_or_in_pairs(isa, k):
    """With bf16 dot products (AVX512-BF16) a row's products are summed in the same order whether its call has one
    or two rows, plain and grouped: the one-program MTP step (two rows a sequence) then draws the same drafts as
    drafting on its own (one row after a rejection)."""
    if isa == "avx2":
        pytest.skip("the widening path (AVX2) takes one and two rows in different orders")
    torch.manual_seed(k)
    lib = cpu.library()
    # many outputs: most sums round to the same bf16 value in either order
    w, stack = torch.randn(4001, k).bfloat16(), torch.randn(5, 2048, k).bfloat16()
    x = torch.randn(2, k).bfloat16().float()
    pair, alone = torch.empty(2, 4001), torch.empty(2, 4001)
    lib.glm45_linear(ctypes.byref(cpu.describe(w)), x.data_ptr(), 2, k, pair.data_ptr(), 4001, 1, 2)
    for r in range(2):
        lib.glm45_linear(ctypes.byref(cpu.describe(w)), x[r].data_ptr(), 1, k, alone[r].data_ptr(), 4001, 1, 2)
    assert torch.equal(pair, alone)
    experts = torch.tensor([3, 1])
    pair, alone = torch.empty(2, 2048), torch.empty(2, 2048)
    lib.glm45_grouped_linear(ctypes.byref(cpu.describe(stack)), x.data_ptr(), 2, k, experts.data_ptr(),
                             pair.data_ptr(), 2048, 1, 2)
    for r in range(2):
        lib.glm45_grouped_linear(ctypes.byref(cpu.describe(stack)), x[r].data_ptr(), 1, k, experts[r:].data_ptr(),
                                 alone[r].data_ptr(), 2048, 1, 2)
    assert torch.equal(pair, alone)


@pytest.mark.parametrize("rows", [32, 45, 130])
@pytest.mark.parametrize("k", [96, 1024])  # 96: 48 input pairs, a last partial block of 16 in the panel repacking
def test_many_bf16_rows_from_torch_take_the_kernels_gemm(isa, rows, k):
    """`linear` of many rows of a bf16 model: on AVX512-BF16 builds the kernels' GEMM with bf16 in and out, which
    gives the program's results for the same rows bit for bit (same products, same order, one rounding)."""
    torch.manual_seed(rows + k)
    w = torch.randn(301, k).bfloat16()  # 301: a last panel of 13 weight rows
    x = torch.randn(rows, k).bfloat16()
    bias = torch.randn(301).bfloat16()
    got = cpu.linear(x, w, bias)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 301)
    assert torch.allclose(got.float(), reference(x, w, bias), rtol=2**-7, atol=1e-3)
    if cpu.lib_gemm_rows(cpu.library()) == 0:
        assert isa == "avx2"  # no bf16 dot products: torch's GEMM multiplied
        return
    program, bias32, x32 = torch.empty(rows, 301), bias.float(), x.float()  # alive while the kernel reads them
    cpu.library().glm45_linear(ctypes.byref(cpu.describe(w, bias32)), x32.data_ptr(), rows, k, program.data_ptr(),
                               301, 1, 2)
    assert torch.equal(got.float(), program)


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4", "fp8"])
@pytest.mark.parametrize("tokens, experts, top_k", [
    (300, 8, 2),  # 60–90 rows an expert: the GEMM on both paths
    (45, 8, 2),   # 7–16 rows: bf16, the dot products here and torch's bf16 GEMM on the torch path; packed, the GEMM
    (6, 16, 2),   # experts with no rows, and with one to three: the dot products (int8 activations for int8/int4)
])
def test_a_bf16_models_routed_experts_in_one_call_equal_the_torch_path(isa, monkeypatch, fmt, tokens, experts,
                                                                      top_k):
    """The routed experts over many tokens (prefill) in one call of the kernels (`prefill.routed_experts`: gather, both
    products, SiLU-and-mul, weighting, index-add, expert after expert) against `Experts._by_expert`'s torch ops with
    `linear`: bit for bit where both take the same kernel, else within a bf16 rounding."""
    from glm45.config import ModelConfig
    from glm45.model.moe import Experts

    hidden, inter = (104, 72) if fmt == "bf16" else (128, 96)  # bf16: vector tails and a partial GEMM panel
    config = ModelConfig(hidden_size=hidden, moe_intermediate_size=inter, n_routed_experts=experts,
                         num_experts_per_tok=top_k)
    generator = torch.Generator().manual_seed(tokens)
    module = Experts(config)
    gate_up = (torch.randn(module.gate_up_proj.shape, generator=generator) * 0.1).bfloat16()
    down = (torch.randn(module.down_proj.shape, generator=generator) * 0.1).bfloat16()
    if fmt != "bf16":
        gate_up, down = quantize(gate_up.float(), fmt), quantize(down.float(), fmt)
    x = torch.randn(tokens, hidden, generator=generator).bfloat16()
    ids = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)]).reshape(-1)
    order = ids.argsort(stable=True)
    weights = torch.rand(tokens * top_k, generator=generator)[order]
    token_of_row, rows_per_expert = order // top_k, torch.bincount(ids, minlength=experts).tolist()
    fused_calls = []
    original = prefill.routed_experts
    monkeypatch.setattr(prefill, "routed_experts", lambda *a: fused_calls.append(original(*a)) or fused_calls[-1])
    with torch.no_grad():
        fused = module._by_expert(x, weights, token_of_row, rows_per_expert, gate_up, down)
        monkeypatch.setattr(prefill, "routed_experts", lambda *a: None)
        reference = module._by_expert(x, weights, token_of_row, rows_per_expert, gate_up, down)
    assert len(fused_calls) == 1
    if cpu.lib_gemm_rows(cpu.library()) == 0:
        assert isa == "avx2" and fused_calls == [None]  # no bf16 dot products: the torch path ran
        return
    assert fused_calls[0] is not None
    if fmt != "bf16" or tokens != 45:
        assert torch.equal(fused, reference)
    else:
        assert torch.allclose(fused.float(), reference.float(), rtol=2**-7, atol=2**-10)


@pytest.mark.parametrize("pairs", [6, 200])
def test_grouped_bf16_rows_of_a_bf16_model_match_the_reference(isa, pairs):
    """Expert GEMVs of many (row, expert) pairs for a bf16 model: each expert's pairs four at a time (counts that
    leave partial groups, an output width that leaves a partial pass of weight rows)."""
    torch.manual_seed(pairs)
    stack = torch.randn(7, 42, 96).bfloat16()
    x = torch.randn(pairs, 96).bfloat16().float()
    experts = torch.randint(0, 7, (pairs,))
    got = torch.empty(pairs, 42)
    lib = cpu.library()
    lib.glm45_grouped_linear(ctypes.byref(cpu.describe(stack)), x.data_ptr(), pairs, 96, experts.data_ptr(),
                             got.data_ptr(), 42, 1, 2)
    expected = torch.stack([reference(x[r:r + 1], stack[e])[0] for r, e in enumerate(experts.tolist())])
    assert torch.equal(got, got.bfloat16().float())
    assert torch.allclose(got, expected, rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("k", [96, 1024, 8192])  # 96: a last 32 after the steps of 64; 8192: past the stack
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5])  # 5: past the dot products' four rows
@pytest.mark.parametrize("scales", ["row", "block"])  # block: 128 × 128 squares, as the FP8 releases
def test_fp8_rows_of_a_bf16_model_match_the_dequantized_reference(isa, k, rows, scales):
    """Activation rows of a bf16 model against fp8 weights: with AVX512-BF16 the e4m3 bytes become bf16 in registers
    once for up to four rows and go through bf16 dot products (zeros and the row's largest values included; fp8
    subnormals, below 2^-6 of the row's unit, read as zero; block scales applied to each block's sums), and more rows
    dequantized to bf16 (as torch-side calls of that many rows round them); else the widening path; the fp32 sums,
    rounded to bf16 once."""
    from glm45.quant.packed import fp8_block_weight

    torch.manual_seed(k + rows)
    if scales == "block":
        data = (torch.randn(301, k) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
        data[:, :7] = 0.0
        packed = fp8_block_weight(data, (torch.rand(3, (k + 127) // 128) + 0.5) * 1e-3)
    else:
        w = torch.randn(301, k) * 0.05
        w[:, :7] = 0.0
        packed = quantize(w, "fp8")
    x = torch.randn(rows, k).bfloat16().float()
    bias = torch.randn(301)
    got = torch.empty(rows, 301)
    lib = cpu.library()
    lib.glm45_linear(ctypes.byref(cpu.describe(packed, bias)), x.data_ptr(), rows, k, got.data_ptr(), 301, 1, 2)
    gemm = rows > cpu.MAX_KERNEL_ROWS and cpu.lib_gemm_rows(lib) > 0
    expected = reference(x, dequantize(packed).bfloat16() if gemm else dequantize(packed), bias)
    assert torch.equal(got, got.bfloat16().float())
    assert torch.allclose(got, expected, rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("fmt", ["int8", "int4", "int4/block", "fp8"])
@pytest.mark.parametrize("rows", [5, 9, 31, 32])  # bf16 dot products below 32 rows, the GEMM from 32
@pytest.mark.parametrize("k", [352, 1024])
def test_packed_weights_against_a_batch_of_bf16_rows_match_bf16_products(isa, fmt, rows, k):
    """The captured step's packed projections against five rows or more of a bf16 model (a batch of decodes): on
    AVX512-BF16 builds the weights dequantized to bf16 (16 rows at a time below 32 activation rows, a GEMM panel at a
    time from 32) times the rows, the bias added to the fp32 sums, rounded to bf16 once; elsewhere the integer dots."""
    torch.manual_seed(rows + k)
    packed = pack(torch.randn(301, k) * 0.05, fmt)  # 301: a last chunk of 13 rows
    x = torch.randn(rows, k).bfloat16().float()
    bias = torch.randn(301)
    got = torch.empty(rows, 301)
    lib = cpu.library()
    lib.glm45_linear(ctypes.byref(cpu.describe(packed, bias)), x.data_ptr(), rows, k, got.data_ptr(), 301, 1, 2)
    assert torch.equal(got, got.bfloat16().float())
    if cpu.lib_gemm_rows(lib) > 0:
        expected = reference(x, dequantize(packed).bfloat16(), bias)
        assert torch.allclose(got, expected, rtol=2**-7, atol=1e-3)
    else:
        expected = reference(x, dequantize(packed), bias)
        assert (got - expected).abs().max() <= 2e-2 * expected.abs().max()


@pytest.mark.parametrize("fmt", ["int8", "int4", "int4/block", "fp8"])
@pytest.mark.parametrize("rows", [1, 3, 4, 9])
@pytest.mark.parametrize("k", [256, 352])  # int4: whole super-blocks of 8 blocks, and a last one of 3
@pytest.mark.parametrize("n", [130, 131])  # one activation row takes int4 weight rows in pairs: an odd last one
def test_packed_kernels_match_the_dequantized_reference(isa, fmt, rows, k, n):
    torch.manual_seed(7)
    w = torch.randn(n, k) * 0.05
    packed = pack(w, fmt)
    x = torch.randn(rows, k)
    bias = torch.randn(n)
    expected = reference(x, dequantize(packed), bias)
    got = cpu.linear(x, packed, bias)
    # int8/int4 quantize the activation row to int8 per block of 32 (≈ 0.4% of its range) for integer dots
    tolerance = 1e-4 if fmt == "fp8" or rows > cpu.MAX_KERNEL_ROWS else 2e-2
    assert (got - expected).abs().max() <= tolerance * expected.abs().max()


@pytest.mark.skipif(ISAS != ["avx2", "avx512"], reason="needs a CPU that runs both the AVX2 and the AVX-512 build")
@pytest.mark.parametrize("fmt", ["int8", "int4", "int4/block"])
@pytest.mark.parametrize("k", [128, 352, 1024, 8288])  # 4 blocks; 11 (int4: a lone last block); 32; 259 (two spans)
@pytest.mark.parametrize("rows", [1, 2, 4])
def test_integer_dot_products_agree_across_instruction_sets(fmt, k, rows):
    """int8/int4 weights against up to 4 activation rows: the AVX-512 build (VNNI's dots) and the AVX2 build
    (maddubs) form the same integer lane sums from the same int8 activation blocks and scale them in the same order,
    so int8 results are equal — plain and grouped; int4's sums of a row's block minimums may be vectorised
    differently by the two builds' compilers."""
    torch.manual_seed(k + rows)
    n = 33
    packed = pack(torch.randn(3, n, k) * 0.05, fmt)
    x = torch.randn(rows, k)
    x3 = torch.randn(3, k)
    bias = torch.randn(n)
    out = {}
    for isa in ISAS:
        lib = cpu.library(isa)
        got = torch.empty(rows, n)
        lib.glm45_linear(ctypes.byref(cpu.describe(packed, bias)), x.data_ptr(), rows, k, got.data_ptr(), n, 0, 2)
        experts = torch.tensor([2, 0, 1])
        grouped = torch.empty(3, n)
        lib.glm45_grouped_linear(ctypes.byref(cpu.describe(packed)), x3.data_ptr(), 3, k, experts.data_ptr(),
                                 grouped.data_ptr(), n, 0, 2)
        out[isa] = got, grouped
    expected = reference(x, dequantize(packed)[0], bias)
    assert (out["avx2"][0] - expected).abs().max() <= 2e-2 * expected.abs().max()  # the activation's int8 rounding
    for got, want in zip(out["avx512"], out["avx2"], strict=True):
        if fmt == "int8":
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("fmt", ["int8", "int4", "int4/block", "fp8", "fp8/block"])
@pytest.mark.parametrize("rows", [5, 40])
def test_packed_weights_against_many_bf16_rows_take_the_gemm(isa, fmt, rows):
    """`linear` of more than MAX_KERNEL_ROWS bf16 rows against packed weights (a quantized bf16 model's prefill): on
    AVX512-BF16 builds the kernels' GEMM over panels dequantized to bf16, elsewhere torch's bf16 GEMM over blocks
    dequantized the same way: the product with the dequantized weights rounded to bf16."""
    from glm45.quant.packed import fp8_block_weight

    torch.manual_seed(rows)
    if fmt == "fp8/block":
        data = (torch.randn(301, 352) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
        packed = fp8_block_weight(data, (torch.rand(3, 3) + 0.5) * 1e-3)
    else:
        packed = pack(torch.randn(301, 352) * 0.05, fmt)  # a partial last panel; int4: a partial super-block
    x = torch.randn(rows, 352).bfloat16()
    bias = torch.randn(301).bfloat16()
    got = cpu.linear(x, packed, bias)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 301)
    expected = reference(x, dequantize(packed).bfloat16(), bias)
    # The GEMM rounds once (products and bias summed in fp32); the other routes add the bias to a rounded product, or
    # widen the weights to fp32 (AVX2 builds).
    gemm = cpu.lib_gemm_rows(cpu.library()) > 0
    atol = (1e-5 if gemm else 2**-8) * expected.abs().max().item()
    assert torch.allclose(got.float(), expected, rtol=2**-7, atol=atol)


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4", "int4/block", "fp8"])
@pytest.mark.parametrize("chosen", [[0, 0, 3, 4, 1, 3],
                                    [2, 2, 2, 0, 2, 2, 2, 1, 2, 4, 4, 4]])  # an expert's pairs in groups of 4 and 2
def test_grouped_kernel_matches_per_expert_products(isa, fmt, chosen):
    torch.manual_seed(1)
    stack = torch.randn(5, 40, 320) * 0.1
    x = torch.randn(len(chosen), 320)
    experts = torch.tensor(chosen)
    weight = stack.bfloat16() if fmt == "bf16" else pack(stack, fmt)
    dense = stack.bfloat16().float() if fmt == "bf16" else dequantize(weight)
    got = cpu.grouped_linear(x.bfloat16() if fmt == "bf16" else x, weight, experts).float()
    expected = torch.stack([reference(x[r:r + 1], dense[e])[0] for r, e in enumerate(experts.tolist())])
    assert (got - expected).abs().max() <= 2e-2 * expected.abs().max()


@pytest.mark.parametrize("fmt", ["int8", "int4", "int4/block"])
@pytest.mark.parametrize("k", [320, 1024])  # chunks of 64 weight rows below 512 inputs, of 16 from there
def test_a_bf16_models_int_experts_that_many_rows_chose_match_bf16_products(isa, fmt, k):
    """Grouped int8/int4 experts against a bf16 model's rows (a batch of decodes): an expert that PACKED_GEMM_ROWS (5)
    pairs or more chose is dequantized a chunk at a time and multiplied in bf16 dot products on AVX512-BF16 builds —
    the dequantized weights rounded to bf16 times the rows, to bf16 rounding; the other experts' pairs (integer dots,
    the activations quantized to int8 per block) and other builds within the integer dots' tolerance."""
    torch.manual_seed(k)
    chosen = [2, 2, 2, 0, 2, 2, 2, 1, 2, 4, 4, 4, 4, 4, 3, 2, 2, 2, 2, 2, 2, 2]  # 7 + 9 pairs on 2, 5 on 4
    packed = pack(torch.randn(5, 150, k) * 0.05, fmt)  # a partial last chunk
    x = torch.randn(len(chosen), k).bfloat16()
    got = cpu.grouped_linear(x, packed, torch.tensor(chosen)).float()
    dense = dequantize(packed).bfloat16()
    expected = torch.stack([reference(x[r:r + 1], dense[e])[0] for r, e in enumerate(chosen)])
    whole = torch.tensor([chosen.count(e) >= 5 for e in chosen])
    bf16_products = cpu.library().glm45_isa().decode() == "avx512" and cpu.lib_gemm_rows(cpu.library()) > 0
    if bf16_products:
        assert torch.allclose(got[whole], expected[whole], rtol=2**-7, atol=1e-5 * expected.abs().max().item())
    assert (got - expected).abs().max() <= 2e-2 * expected.abs().max()


@pytest.mark.parametrize("fmt", ["int8", "int4", "int4/block", "fp8"])
def test_dequantize_kernel_equals_the_reference(isa, fmt):
    torch.manual_seed(2)
    w = torch.randn(50, 352)
    packed = pack(w, fmt)
    torch.testing.assert_close(cpu.dequantize_rows(packed, 0, 3, 20), dequantize(packed)[3:20])


def test_fp8_block_scales_match_the_reference(isa):
    from glm45.quant.packed import fp8_block_weight

    torch.manual_seed(3)
    data = (torch.randn(200, 300) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
    packed = fp8_block_weight(data, torch.rand(2, 3) + 0.5)
    x = torch.randn(2, 300)
    torch.testing.assert_close(cpu.linear(x, packed), x @ dequantize(packed).t(), rtol=1e-4, atol=1e-3)
    # the kernels' dequantization (a vector at a time within each block of 128 inputs, a partial last block of 44):
    # the reference's one product per weight, exactly
    assert torch.equal(cpu.dequantize_rows(packed, 0, 120, 140), dequantize(packed)[120:140])


def test_upcast_path_for_many_rows_matches_float32():
    torch.manual_seed(0)
    w = torch.randn(1100, 64).bfloat16()  # more rows than one upcast chunk
    x = torch.randn(2, 7, 64).bfloat16()
    got = cpu.linear(x, w)
    assert got.shape == (2, 7, 1100)
    assert torch.allclose(got.float(), reference(x, w), rtol=2**-8, atol=1e-3)


def test_fallbacks_keep_torch_semantics():
    w = torch.randn(8, 24).bfloat16()  # 24 is not a multiple of 32: torch's kernel
    x = torch.randn(1, 24).bfloat16()
    assert torch.equal(cpu.linear(x, w), F.linear(x, w))
    w32, x32 = w.float().requires_grad_(), x.float()
    y = cpu.linear(x32, w32)  # float32 and autograd: plain F.linear, gradients flow
    y.sum().backward()
    assert w32.grad is not None
    wb = torch.randn(16, 32, dtype=torch.bfloat16, requires_grad=True)
    cpu.linear(torch.randn(1, 32, dtype=torch.bfloat16), wb).sum().backward()
    assert wb.grad is not None


needs_bf16_dot = pytest.mark.skipif(
    cpu.library() is None or not cpu.native_bf16_gemm(),
    reason="this CPU has no AVX512-BF16: the fused attention kernel does not run (torch's SDPA does)")


@needs_bf16_dot
@pytest.mark.parametrize("q_len, keys_len, heads, kv_heads, dim", [
    (1, 1, 2, 1, 32),       # one token
    (5, 5, 4, 2, 64),       # a prompt shorter than a tile of keys
    (37, 100, 8, 2, 128),   # a chunk after a cached prefix (offset causal mask)
    (300, 300, 8, 2, 128),  # several blocks of query rows, odd tails
    (64, 1000, 12, 4, 96),  # dimensions a multiple of 32 but not of 64
    (129, 129, 4, 4, 256),  # no grouping; the largest head size taken
])
def test_fused_causal_attention_matches_float64(q_len, keys_len, heads, kv_heads, dim):
    """Against float64 attention over the same bf16 inputs, read through a shuffled slot list of a larger cache:
    within the rounding of the probabilities to bf16 (which torch's bf16 SDPA exceeds on the same inputs)."""
    gen = torch.Generator().manual_seed(q_len)
    cache_rows = keys_len + 37
    k_cache = torch.randn(cache_rows, kv_heads, dim, generator=gen).bfloat16()
    v_cache = torch.randn(cache_rows, kv_heads, dim, generator=gen).bfloat16()
    slots = torch.randperm(cache_rows, generator=gen)[:keys_len]
    q = (2 * torch.randn(q_len, heads, dim, generator=gen)).bfloat16()
    out = prefill.causal_attention(q, k_cache, v_cache, slots, dim ** -0.5)
    assert out is not None and out.dtype == torch.float32 and out.shape == q.shape
    keys, values = k_cache[slots].transpose(0, 1).double(), v_cache[slots].transpose(0, 1).double()
    mask = torch.ones(q_len, keys_len, dtype=torch.bool).tril(keys_len - q_len)
    expected = F.scaled_dot_product_attention(q.transpose(0, 1).double(), keys, values, attn_mask=mask,
                                              enable_gqa=True).transpose(0, 1)
    error = (out.double() - expected).abs()
    torch_bf16 = F.scaled_dot_product_attention(q.transpose(0, 1), keys.bfloat16(), values.bfloat16(), attn_mask=mask,
                                                enable_gqa=True).transpose(0, 1).double()
    assert error.max() < 4e-3 and error.max() <= (torch_bf16 - expected).abs().max()
    assert error.mean() < 3e-4


@needs_kernel
def test_fused_attention_declines_what_it_does_not_take(monkeypatch):
    q, cache, slots = torch.zeros(4, 2, 64).bfloat16(), torch.zeros(8, 1, 64).bfloat16(), torch.arange(6)
    assert prefill.causal_attention(q.float(), cache.float(), cache.float(), slots, 0.125) is None  # not bf16
    assert prefill.causal_attention(q[..., :48], cache[..., :48], cache[..., :48], slots, 0.1) is None  # 48 dims
    monkeypatch.setenv("GLM45_CPU_ISA", "avx2")
    cpu.library.cache_clear()
    try:
        assert prefill.causal_attention(q, cache, cache, slots, 0.125) is None  # no bf16 dot products
    finally:
        cpu.library.cache_clear()


def run_attention_op(qkv, k_cache, v_cache, tables, lengths, heads, threads, bf16_model):
    """The captured step's attention op (csrc/program.c, op_attn) alone: the output [rows, heads · dim]."""
    from glm45.engine import cpu_program as ops

    rows, (_, kv_heads, dim), block = len(lengths), k_cache.shape, 16
    out = torch.zeros(rows, heads * dim)
    scratch = torch.zeros(threads, cpu.library().glm45_attention_scratch(dim, heads // kv_heads))
    program = ops.Program()
    program.add(ops.OP_ATTN, (qkv, k_cache, v_cache, tables, lengths, out, scratch),
                (rows, heads, kv_heads, dim, block, tables.shape[1], qkv.shape[1], heads * dim,
                 ops.KV_DTYPES[k_cache.dtype], scratch.shape[1]), (dim ** -0.5,))
    program.finish()
    program.run(bf16_model, threads)
    return out


def softmax_attention_row(qkv, k_cache, v_cache, table, length, heads):
    """float64 attention of one row's queries over the first `length` keys of its block table (blocks of 16)."""
    _, kv_heads, dim = k_cache.shape
    slots = (table.long()[:, None] * 16 + torch.arange(16)).reshape(-1)[:length]
    keys = k_cache.double()[slots].repeat_interleave(heads // kv_heads, 1).transpose(0, 1)[None]
    values = v_cache.double()[slots].repeat_interleave(heads // kv_heads, 1).transpose(0, 1)[None]
    q = qkv[: heads * dim].double().view(1, heads, 1, dim)
    return F.scaled_dot_product_attention(q, keys, values)[0, :, 0].reshape(-1)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("heads, kv_heads, dim, context, rows", [
    (4, 2, 64, 1, 1),      # one key
    (4, 2, 64, 33, 3),     # a verification's rows: one pass over the keys for three positions
    (8, 2, 128, 150, 6),   # more rows of one sequence than a pass takes, tiles of keys and a partial last tile
    (12, 1, 128, 97, 2),   # a large group
    (6, 2, 64, 40, 5),     # an odd group: a row's queries do not pair up evenly
    (4, 4, 64, 5, 9),      # one query per KV head
    (4, 1, 64, 700, 2)])   # one KV head: with more threads than runs, a head's keys are split between threads
@pytest.mark.parametrize("threads", [1, 2, 5])
def test_decode_attention_op_matches_softmax_attention(isa, kv_dtype, heads, kv_heads, dim, context, rows, threads):
    """On a paged cache: row r of one sequence sees the first context + r keys; a second sequence in the same step
    sees its own blocks."""
    torch.manual_seed(0)
    blocks = -(-(context + rows) // 16)
    k_cache = torch.randn(2 * blocks * 16, kv_heads, dim).to(kv_dtype)
    v_cache = torch.randn(2 * blocks * 16, kv_heads, dim).to(kv_dtype)
    qkv = torch.randn(rows + 1, (heads + 2 * kv_heads) * dim)
    table, other = torch.randperm(blocks).to(torch.int32), torch.randperm(blocks).to(torch.int32) + blocks
    tables = torch.cat([table.repeat(rows, 1), other[None]])
    lengths = torch.cat([torch.arange(context, context + rows), torch.tensor([context + 1])]).to(torch.int32)
    out = run_attention_op(qkv, k_cache, v_cache, tables, lengths, heads, threads, bf16_model=False)
    for r in range(rows + 1):
        expected = softmax_attention_row(qkv[r], k_cache.float(), v_cache.float(), tables[r], lengths[r], heads)
        torch.testing.assert_close(out[r].double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads, kv_heads, dim, context, rows, threads", [
    (4, 2, 64, 50, 1, 2), (8, 2, 128, 150, 6, 2), (12, 1, 128, 600, 2, 5), (6, 2, 64, 41, 3, 1)])
def test_decode_attention_op_of_a_bf16_model_matches_softmax_attention(isa, heads, kv_heads, dim, context, rows,
                                                                      threads):
    """A bf16 model's step (queries rounded to bf16, a bf16 cache, outputs rounded): on CPUs with bf16 dot products
    the op multiplies bf16 pairs and rounds the probabilities to bf16 as torch's CPU flash attention does."""
    torch.manual_seed(1)
    blocks = -(-(context + rows) // 16)
    k_cache = torch.randn(blocks * 16, kv_heads, dim).bfloat16()
    v_cache = torch.randn(blocks * 16, kv_heads, dim).bfloat16()
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim).bfloat16().float()
    tables = torch.randperm(blocks).to(torch.int32).repeat(rows, 1)
    lengths = torch.arange(context, context + rows, dtype=torch.int32)
    out = run_attention_op(qkv, k_cache, v_cache, tables, lengths, heads, threads, bf16_model=True)
    assert torch.equal(out, out.bfloat16().float())  # rounded like the bf16 model's activations
    for r in range(rows):
        expected = softmax_attention_row(qkv[r], k_cache.float(), v_cache.float(), tables[r], lengths[r], heads)
        torch.testing.assert_close(out[r].double(), expected, rtol=2e-2, atol=4e-3)


def test_activation_quantization_op_matches_round_half_even(isa):
    """The step's OP_QUANT: each row's blocks of 32 as int8 codes round(x · 127 / max|x|) (to nearest even, as
    torch.round), the block's scale max|x| / 127 and scale × Σ codes, bit for bit; an all-zero block gives zeros."""
    from glm45.engine import cpu_program as ops

    torch.manual_seed(0)
    rows, width = 3, 128
    x = torch.randn(rows, width) * torch.tensor([0.01, 1.0, 300.0])[:, None]
    x[1, 32:64] = 0.0
    x[2, 64:96] = torch.arange(32) - 15.5  # exact halves after scaling: ties go to even
    xq = torch.zeros(rows, width, dtype=torch.int8)
    xd, xs = torch.zeros(rows, width // 32), torch.zeros(rows, width // 32)
    program = ops.Program()
    program.add(ops.OP_QUANT, (x, xq, xd, xs), (rows, width, width))
    program.finish()
    program.run(False, 2)
    blocks = x.view(rows, -1, 32)
    d = blocks.abs().amax(-1) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    codes = torch.round(blocks * inv[..., None])
    assert torch.equal(xq.view(rows, -1, 32), codes.to(torch.int8))
    assert torch.equal(xd, d)
    assert torch.equal(xs, d * codes.sum(-1))


@needs_kernel
@pytest.mark.parametrize("rows, width", [(1, 256), (37, 104), (300, 1024)])  # 104: a vector tail
def test_rms_norm_of_a_bf16_models_rows_is_torchs(isa, rows, width):
    """`prefill.rms_norm` (RMSNorm's forward of a bf16 model at inference, the captured step's kernel): torch's result
    but where an RMS summed in another order moves a value by one bf16 step; the module takes it, and a float32
    model, a non-contiguous input or a gradient keeps torch's ops."""
    from glm45.model.layers import RMSNorm

    generator = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, width, generator=generator) * 3).bfloat16()
    norm = RMSNorm(width, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(width, generator=generator) + 0.5)
    norm.bfloat16()
    expected = norm.weight * F.rms_norm(x.float(), (width,), eps=1e-5).bfloat16()
    with torch.no_grad():
        got = norm(x)
        assert torch.equal(got, prefill.rms_norm(x, norm.weight, 1e-5))
        assert prefill.rms_norm(x.float(), norm.weight.float(), 1e-5) is None
        assert prefill.rms_norm(torch.stack([x, x], -1)[..., 0], norm.weight, 1e-5) is None  # not contiguous
        assert prefill.rms_norm(x[:, :-8], norm.weight, 1e-5) is None  # not the weight's width
    torch.testing.assert_close(got.float(), expected.float(), rtol=2**-7, atol=1e-6)
    assert (got == expected).float().mean() > 0.97
    assert prefill.rms_norm(x, norm.weight, 1e-5) is None  # training: the weight wants its gradient


@needs_kernel
def test_captured_silu_and_mul_is_torchs(isa):
    """The captured step's SiLU-and-mul (vectorised e^x): a bf16 model's result is torch's bit for bit (silu rounded
    to bf16, times up, rounded); fp32 within float rounding."""
    from glm45.engine import cpu_program as ops

    rows, width = 16, 776  # not a multiple of the vector width: the scalar tail too
    gate_up = (torch.randn(rows, 2 * width, generator=torch.Generator().manual_seed(0)) * 4).bfloat16().float()
    gate, up = gate_up[:, :width], gate_up[:, width:]
    for rounding in (True, False):
        out = torch.zeros(rows, width)
        program = ops.Program()
        program.add(ops.OP_SILU_MUL, (gate_up, out), (rows, width, 2 * width, width))
        program.finish()
        program.run(rounding, 2)
        if rounding:
            assert torch.equal(out, (F.silu(gate.bfloat16()) * up.bfloat16()).float())
        else:
            assert torch.allclose(out, F.silu(gate) * up, rtol=1e-6, atol=1e-30)


@needs_kernel
def test_host_sampler_matches_the_tensor_path_on_each_isa(isa, monkeypatch):
    """csrc/sample.c's vector passes (sums, thresholds, candidate masks) on each instruction set: the tensor path's
    distributions, and its tokens for the same uniforms."""
    from glm45.engine import sampler
    from glm45.engine.sampling_params import SamplingParams

    params = [SamplingParams(temperature=0.7), SamplingParams(top_p=0.9, temperature=0.6),
              SamplingParams(top_k=40, min_p=0.05), SamplingParams(top_k=3000, top_p=0.95, temperature=1.3)]
    logits = torch.randn(len(params), 5003, generator=torch.Generator().manual_seed(1)) * 3
    logits[1, 100:4000] = float("-inf")
    rows, row_params = logits.repeat_interleave(32, 0), [p for p in params for _ in range(32)]
    results = {}
    for host in (True, False):
        monkeypatch.setattr(sampler, "HOST_KERNEL", host)
        generators = [torch.Generator().manual_seed(i) for i in range(len(row_params))]
        results[host] = (sampler.distributions(logits, params), sampler.choose(rows, row_params, generators))
    assert torch.allclose(results[True][0], results[False][0], atol=1e-6, rtol=1e-4)
    assert torch.equal(results[True][1], results[False][1])


@needs_kernel
def test_captured_argmax_is_numpys_first_maximum(isa):
    """The captured step's greedy choice (csrc/program.c, argmax_row: sixteen lanes, then a scalar tail) against
    numpy's argmax: the first maximum wherever it lies (lane, tail, ties across lanes and with the tail), a NaN as
    the maximum, -inf rows, rows shorter than a vector."""
    lib = cpu.library()
    generator = torch.Generator().manual_seed(0)
    rows = []
    for vocab in (1, 5, 15, 16, 17, 31, 33, 3072, 5003, 151552):
        x = torch.randn(12, vocab, generator=generator)
        x[1] = float("-inf")
        x[2] = 0.0                                   # a tie everywhere: index 0
        x[3, vocab // 2:] = 9.0                      # ties from the middle on
        x[4, -1] = 9.0                               # the last element (the tail when vocab % 16)
        x[5, [vocab // 3, vocab - 1]] = 9.0          # a tie between a lane and the tail
        x[6, vocab // 2] = float("nan")
        x[7, [vocab // 4, vocab - 1]] = float("nan")  # the first NaN counts
        x[8, :] = -0.0
        x[8, vocab // 2] = 0.0                       # -0.0 == 0.0: index 0
        x[9, vocab // 3] = float("inf")
        x[10] = x[10].round()                        # many ties among the lanes
        rows.append(x)
    for x in rows:
        out = torch.empty(x.shape[0], dtype=torch.int64)
        lib.glm45_argmax_rows(x.data_ptr(), x.shape[0], x.shape[1], x.shape[1], out.data_ptr())
        assert out.tolist() == x.numpy().argmax(-1).tolist(), x.shape[1]


def run_qk_rope(qkv, q_norm, k_norm, positions, rotary_dim, kv_heads, dim, rounding, fills, kv_dtype):
    """The captured step's QK-norm + RoPE + cache write (op_qk_rope) as `len(fills)` ops in one program, op i on
    its own copy of `qkv` and caches, those with `fills[i]` filling the cos/sin table: the copies and the caches."""
    from glm45.engine import cpu_program as ops
    from glm45.model.layers import RotaryEmbedding

    rows, heads = qkv.shape[0], qkv.shape[1] // dim - 2 * kv_heads
    copies = [qkv.clone() for _ in fills]
    caches = [(torch.zeros(rows, kv_heads, dim, dtype=kv_dtype), torch.zeros(rows, kv_heads, dim, dtype=kv_dtype))
              for _ in fills]
    table, slots = torch.zeros(rows, rotary_dim), torch.arange(rows)
    inv_freq = RotaryEmbedding(rotary_dim, 10000.0).inv_freq(torch.device("cpu"))
    program = ops.Program()
    for copy, (k_cache, v_cache), fill in zip(copies, caches, fills, strict=True):
        program.add(ops.OP_QK_ROPE, (copy, q_norm, k_norm, positions, k_cache, v_cache, slots, inv_freq, table),
                    (rows, heads, kv_heads, dim, rotary_dim, qkv.shape[1], ops.KV_DTYPES[kv_dtype], fill),
                    (1e-5,))
    program.finish()
    program.run(rounding, 2)
    return copies, caches


@needs_kernel
@pytest.mark.parametrize("heads, kv_heads, dim, rotary_dim", [(4, 2, 64, 32), (8, 2, 128, 64), (2, 1, 40, 20)])
def test_captured_qk_norm_and_rope_are_torchs(isa, heads, kv_heads, dim, rotary_dim):
    """op_qk_rope (vectorised norm and rotation, the cos/sin table filled by the program's first such op): a bf16
    model's queries and keys are torch's RMSNorm and rotate-half RoPE in bf16 (an RMS summed in another order may
    move a value by one bf16 step), fp32 ones within float rounding; the cache holds the rotated keys and the values;
    an op that reads the table equals one that fills it, bit for bit."""
    from glm45.model.layers import RMSNorm, RotaryEmbedding, apply_rotary

    torch.manual_seed(0)
    rows = 7
    positions = torch.tensor([0, 1, 5, 17, 100, 2047, 40000])
    qkv = (torch.randn(rows, (heads + 2 * kv_heads) * dim) * 3).bfloat16().float()
    q_norm, k_norm = (torch.rand(dim) + 0.5).bfloat16().float(), (torch.rand(dim) + 0.5).bfloat16().float()
    for rounding, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        (first, second), caches = run_qk_rope(qkv, q_norm, k_norm, positions, rotary_dim, kv_heads, dim, rounding,
                                              [1, 0], torch.float32)
        assert torch.equal(first, second) and torch.equal(caches[0][0], caches[1][0])
        x = qkv.to(dtype).view(rows, heads + 2 * kv_heads, dim)
        cos, sin = RotaryEmbedding(rotary_dim, 10000.0)(positions, dtype)
        expected = []
        for part, weight in ((x[:, :heads], q_norm), (x[:, heads:heads + kv_heads], k_norm)):
            norm = RMSNorm(dim).to(dtype)
            norm.weight.data.copy_(weight)
            expected.append(apply_rotary(norm(part), cos, sin))
        expected = torch.cat([*expected, x[:, heads + kv_heads:]], dim=1).float().reshape(rows, -1)
        if rounding:
            assert torch.equal(first, first.bfloat16().float())
            torch.testing.assert_close(first, expected, rtol=2 ** -7, atol=1e-6)
            assert (first == expected).float().mean() > 0.97
        else:
            torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)
        k_cache, v_cache = caches[0]
        assert torch.equal(k_cache.reshape(rows, -1), first[:, heads * dim:(heads + kv_heads) * dim])
        assert torch.equal(v_cache.reshape(rows, -1), first[:, (heads + kv_heads) * dim:])
        # a bf16 cache holds them rounded to nearest (an fp32 model's values are not bf16 values already)
        noisy = qkv + 1e-3 * torch.randn(qkv.shape)
        _, ((k32, v32),) = run_qk_rope(noisy, q_norm, k_norm, positions, rotary_dim, kv_heads, dim, rounding, [1],
                                       torch.float32)
        _, ((k16, v16),) = run_qk_rope(noisy, q_norm, k_norm, positions, rotary_dim, kv_heads, dim, rounding, [1],
                                       torch.bfloat16)
        assert torch.equal(k16, k32.bfloat16()) and torch.equal(v16, v32.bfloat16())
