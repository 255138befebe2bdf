"""The native CPU BitStack kernel matches the reference; `auto` runs it for decode-sized calls.

The kernel shares its extension with the GPTQ kernel (compiled once per session by fixture
`kernel`, about a minute the first time on a machine, then loaded from memtool's cache).
Tolerance: the kernel forms z = v_k * x and sums it over the negative columns of each sign byte
(a lookup table), then `total - 2 * sum` per rank, all in float32: the same products as the
reference summed in another order, so float32 results must agree to 1e-4 relative to the
output's largest magnitude (observed ~3e-7).
"""

import logging

import pytest
import torch

import memtool.ops as ops
from memtool.errors import MemtoolError
from memtool.formats.bitstack_linear import BitStackLinear
from memtool.formats.synthetic import random_bitstack_layer
from memtool.ops import (
    CPU_MAX_ROWS_BITSTACK,
    KernelBackend,
    backend_used,
    bitstack_backend_used,
    bitstack_linear,
)
from memtool.ops.cpu import cpu_bitstack_linear
from memtool.ops.reference import bitstack_linear as reference_linear

FP32_RTOL = 1e-4


def make_layer(
    out_features: int,
    in_features: int,
    rank: int,
    blocks: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
) -> tuple:
    """Random packed BitStack layer: `(signs, u, v, in_features)`, positional for the ops."""
    gen = torch.Generator().manual_seed(seed)
    return random_bitstack_layer(out_features, in_features, rank, blocks, gen, dtype=dtype).args()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.float().abs().max().clamp_min(1e-12)
    return float((actual.float() - expected.float()).abs().max() / scale)


# (out, in, rank, blocks): inputs not a multiple of 8 (a ragged last byte), ranks 1, 3 and 7
# (4-lane and 8-lane tables), one block and several.
SHAPES = {
    "n13-r3-j1": (40, 13, 3, 1),
    "n100-r7-j5": (48, 100, 7, 5),
    "n100-r1-j5": (24, 100, 1, 5),
}


@pytest.mark.parametrize("factors", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_kernel_matches_reference(kernel, shape, rows, bias, factors):
    layer = make_layer(*shape, seed=rows, dtype=factors)
    gen = torch.Generator().manual_seed(rows + 1)
    x = torch.randn(rows, shape[1], generator=gen)
    b = torch.randn(shape[0], generator=gen) if bias else None
    b_before = None if b is None else b.clone()

    out = cpu_bitstack_linear(x, *layer, bias=b)
    expected = reference_linear(x, *layer, bias=b)
    assert out.shape == (rows, shape[0]) and out.dtype == torch.float32
    assert relative_error(out, expected) <= FP32_RTOL
    if b is not None:
        assert torch.equal(b, b_before)


@pytest.mark.parametrize(
    ("rank", "in_features"),
    [(4, 576), (8, 64), (16, 576), (20, 40), (32, 72), (33, 40), (70, 24)],
    ids=["r4-n576", "r8", "r16-n576", "r20", "r32", "r33-two-passes", "r70-three-passes"],
)
def test_kernel_handles_every_rank(kernel, rank, in_features):
    # Tables are 4 lanes wide up to rank 4, then 8, 16, 24 or 32; ranks over 32 run in passes.
    layer = make_layer(32, in_features, rank, 3, seed=rank)
    x = torch.randn(2, in_features, generator=torch.Generator().manual_seed(rank))
    out = cpu_bitstack_linear(x, *layer, bias=torch.ones(32))
    assert relative_error(out, reference_linear(x, *layer, bias=torch.ones(32))) <= FP32_RTOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_computes_half_inputs_in_float32(kernel, dtype):
    # Both paths compute in float32 and round the output once, so they differ by at most one
    # rounding of the output dtype.
    layer = make_layer(48, 100, 7, 5, seed=3)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 100, generator=gen).to(dtype)
    bias = torch.randn(48, generator=gen).to(dtype)
    out = cpu_bitstack_linear(x, *layer, bias=bias)
    assert out.dtype == dtype
    assert relative_error(out, reference_linear(x, *layer, bias=bias)) <= 1e-2


def test_kernel_reads_other_factor_dtypes_and_strided_factors(kernel):
    signs, u, v, n = make_layer(40, 52, 6, 3, seed=4, dtype=torch.float32)
    x = torch.randn(3, 52, generator=torch.Generator().manual_seed(4))
    expected = reference_linear(x, signs, u, v, n)
    # bfloat16 factors are widened by the op; rank-major storage is made contiguous.
    u_bf16, v_bf16 = u.bfloat16(), v.bfloat16()
    out = cpu_bitstack_linear(x, signs, u_bf16, v_bf16, n)
    assert relative_error(out, reference_linear(x, signs, u_bf16, v_bf16, n)) <= FP32_RTOL
    u_t = u.transpose(1, 2).contiguous().transpose(1, 2)
    v_t = v.transpose(1, 2).contiguous().transpose(1, 2)
    assert not u_t.is_contiguous()
    assert relative_error(cpu_bitstack_linear(x, signs, u_t, v_t, n), expected) <= FP32_RTOL


@pytest.mark.parametrize("shape", [(2, 5, 100), (0, 100)], ids=["3d", "no-rows"])
def test_kernel_handles_leading_dims_and_no_rows(kernel, shape):
    layer = make_layer(48, 100, 7, 2, seed=5)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
    out = cpu_bitstack_linear(x, *layer, bias=torch.ones(48))
    expected = reference_linear(x, *layer, bias=torch.ones(48))
    assert out.shape == expected.shape == (*shape[:-1], 48)
    if x.numel():
        assert relative_error(out, expected) <= FP32_RTOL


def test_kernel_with_no_blocks_returns_the_bias(kernel):
    # A BitStackLinear starts with no blocks loaded; its weight is then zero.
    signs, u, v, n = make_layer(24, 13, 3, 1)
    signs, u, v = signs[:0], u[:0], v[:0]
    x = torch.randn(2, 13)
    bias = torch.randn(24)
    assert torch.equal(cpu_bitstack_linear(x, signs, u, v, n, bias), bias.expand(2, 24))
    assert torch.equal(cpu_bitstack_linear(x, signs, u, v, n), torch.zeros(2, 24))


def test_kernel_splits_work_across_threads_with_the_same_result(kernel):
    # 3 rows x 4 blocks = 12 (row, block) items, each ~0.7M adds: enough to split over two
    # threads; one row of one block on a 2048-row layer is cut into two output-row slices.
    # Each item writes its own slice and blocks are summed in order: bitwise equal results.
    threads = torch.get_num_threads()
    for rows, blocks in ((3, 4), (1, 1)):
        layer = make_layer(2048, 1000, 4, blocks, seed=blocks)
        x = torch.randn(rows, 1000, generator=torch.Generator().manual_seed(rows))
        try:
            torch.set_num_threads(1)
            one = cpu_bitstack_linear(x, *layer)
            torch.set_num_threads(2)
            two = cpu_bitstack_linear(x, *layer)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(one, two)
        assert relative_error(two, reference_linear(x, *layer)) <= FP32_RTOL


def test_kernel_op_passes_opcheck(kernel):
    signs, u, v, n = make_layer(48, 100, 7, 3, seed=6)
    x = torch.randn(3, 100, generator=torch.Generator().manual_seed(6))
    torch.library.opcheck(torch.ops.memtool_cpu.bitstack_gemv, (x, signs, u, v, torch.ones(48), n))
    torch.library.opcheck(torch.ops.memtool_cpu.bitstack_gemv, (x, signs, u, v, None, n))


def test_kernel_op_checks_its_arguments(kernel):
    signs, u, v, n = make_layer(24, 13, 3, 2)
    op = torch.ops.memtool_cpu.bitstack_gemv
    x = torch.randn(2, 13)
    with pytest.raises(RuntimeError, match="x must be a 2-D float32"):
        op(x.double(), signs, u, v, None, n)
    with pytest.raises(RuntimeError, match="x must have in_features columns"):
        op(x, signs, u, v, None, 12)
    with pytest.raises(RuntimeError, match="ceil"):
        op(torch.randn(2, 17), signs, u, v[:, :1].expand(2, 17, 3), None, 17)
    with pytest.raises(RuntimeError, match="v must be"):
        op(x, signs, u, v[..., :2], None, n)
    with pytest.raises(RuntimeError, match="bias must be"):
        op(x, signs, u, v, torch.ones(23), n)


def test_wrapper_refuses_what_the_reference_refuses(kernel):
    signs, u, v, n = make_layer(24, 13, 3, 2)
    with pytest.raises(MemtoolError, match="expects 13 features"):
        cpu_bitstack_linear(torch.randn(2, 12), signs, u, v, n)
    with pytest.raises(MemtoolError, match=r"u must be \[2, 24, rank\]"):
        cpu_bitstack_linear(torch.randn(2, 13), signs, u[:1], v, n)
    meta = [t.to("meta") for t in (signs, u, v)]
    with pytest.raises(MemtoolError, match="cpu backend cannot run this call: tensors are on meta"):
        cpu_bitstack_linear(torch.randn(2, 13, device="meta"), *meta, n)


# --- backend choice -------------------------------------------------------------------------


def test_auto_runs_the_cpu_kernel_for_decode_and_says_so(kernel, monkeypatch, caplog):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(ops, "_logged", set())
    layer = make_layer(48, 100, 7, 5, seed=7)
    x = torch.randn(1, 100, generator=torch.Generator().manual_seed(7))

    assert bitstack_backend_used(x, 100) is KernelBackend.CPU
    with caplog.at_level(logging.INFO, logger="memtool.ops"):
        out = bitstack_linear(x, *layer)
    assert "bitstack_linear runs on the cpu backend (cpu tensors)" in caplog.messages
    assert torch.equal(out, cpu_bitstack_linear(x, *layer))
    assert relative_error(out, reference_linear(x, *layer)) <= FP32_RTOL


def test_auto_runs_the_reference_above_the_crossover(kernel, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layer = make_layer(48, 100, 7, 5, seed=8)
    at_limit = torch.randn(CPU_MAX_ROWS_BITSTACK, 100)
    prefill = torch.randn(2, (CPU_MAX_ROWS_BITSTACK + 2) // 2, 100)  # rows counted across dims
    assert bitstack_backend_used(at_limit, 100) is KernelBackend.CPU
    assert bitstack_backend_used(prefill, 100) is KernelBackend.REFERENCE
    assert torch.equal(bitstack_linear(prefill, *layer), reference_linear(prefill, *layer))
    # Asked for explicitly, the kernel runs at any size.
    assert bitstack_backend_used(prefill, 100, "cpu") is KernelBackend.CPU
    out = bitstack_linear(prefill, *layer, backend=KernelBackend.CPU)
    assert relative_error(out, reference_linear(prefill, *layer)) <= FP32_RTOL
    assert bitstack_backend_used(at_limit, 100, "reference") is KernelBackend.REFERENCE


def test_bitstack_linear_module_decodes_on_the_kernel(kernel, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    signs, u, v, n = make_layer(24, 40, 4, 3, seed=9)
    module = BitStackLinear(40, 24, 4, bias=torch.randn(24))
    x = torch.randn(1, 1, 40, generator=torch.Generator().manual_seed(9))
    assert torch.equal(module(x), module.bias.expand(1, 1, 24))  # no blocks yet
    module.set_blocks(signs, u, v)
    expected = reference_linear(x, signs, u, v, n, module.bias)
    assert relative_error(module(x), expected) <= FP32_RTOL


def test_a_kernel_that_fails_to_build_warns_once_under_auto(monkeypatch, caplog):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(ops, "cpu_kernel_status", lambda: (False, "no C++ compiler (test)"))
    monkeypatch.setattr(ops, "_warned_cpu_kernel", False)
    layer = make_layer(24, 13, 3, 2, seed=10)
    x = torch.randn(1, 13, generator=torch.Generator().manual_seed(10))

    assert bitstack_backend_used(x, 13) is KernelBackend.REFERENCE
    with caplog.at_level(logging.WARNING, logger="memtool.ops"):
        out = bitstack_linear(x, *layer)
        bitstack_linear(x, *layer)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "the native CPU kernel is unavailable (no C++ compiler (test)); using the reference"
    ]
    assert torch.equal(out, reference_linear(x, *layer))
    with pytest.raises(MemtoolError, match="cpu backend cannot run here: no C\\+\\+ compiler"):
        bitstack_linear(x, *layer, backend="cpu")


def test_asking_for_cpu_on_other_devices_is_an_error():
    with pytest.raises(MemtoolError, match="cpu backend cannot run here: tensors are on cuda"):
        backend_used("cuda", "cpu")
