"""BitStack ops: the sign packing round-trips, the reference is the formula, the kernel matches.

Kernel tests run the Triton interpreter on CPU tensors in one child process (fixture
`run_interpreted`, see conftest.py). Tolerance: the kernel forms the same exact float32
products of the factors and sums them, and the tile products, in another order, so float32
results must agree to 1e-4 relative to the output's largest magnitude (observed ~1e-7).
"""

import logging

import pytest
import torch
from kernel_checks import assert_close_relative, assert_same_reference_bfloat16

import memtool.ops as ops
from memtool.errors import MemtoolError
from memtool.formats.bitstack_pack import pack_signs, packed_width, unpack_signs
from memtool.formats.synthetic import random_bitstack_layer
from memtool.ops import CPU_MAX_ROWS_BITSTACK, KernelBackend, backend_used, bitstack_linear
from memtool.ops.cpu import cpu_kernel_status
from memtool.ops.reference import bitstack_linear as reference_linear
from memtool.ops.reference import bitstack_reconstruct

FP32_RTOL = 1e-4


def make_layer(out_features, in_features, rank, blocks, seed=0, dtype=torch.float16):
    """Random BitStack layer: `(sign matrices ±1 float32, packed kwargs for the ops)`."""
    gen = torch.Generator().manual_seed(seed)
    layer = random_bitstack_layer(out_features, in_features, rank, blocks, gen, dtype=dtype)
    packed = {"signs": layer.packed_signs, "u": layer.u, "v": layer.v, "in_features": in_features}
    return layer.signs, packed


# --- sign packing -------------------------------------------------------------------------


@pytest.mark.parametrize("cols", [1, 8, 13, 576])
def test_signs_round_trip_with_ragged_widths(cols):
    matrix = torch.randn(3, 5, cols, generator=torch.Generator().manual_seed(cols))
    packed = pack_signs(matrix)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, packed_width(cols))
    assert torch.equal(unpack_signs(packed, cols), torch.where(matrix < 0, -1.0, 1.0))
    # The padding bits of the last byte are zero.
    used = cols - 8 * (packed_width(cols) - 1)
    assert torch.all(packed[..., -1] >> used == 0)


def test_signs_bit_layout_and_zero_is_positive():
    matrix = torch.ones(2, 13)
    matrix[0, 9] = -2.0  # byte 1, bit 1
    matrix[1, 0] = -0.5  # byte 0, bit 0
    matrix[1, 12] = -1.0  # byte 1, bit 4
    matrix[0, 3] = 0.0  # zero counts as +1: no bit
    matrix[1, 5] = -0.0  # so does negative zero
    packed = pack_signs(matrix)
    assert packed.tolist() == [[0, 2], [1, 16]]
    unpacked = unpack_signs(packed, 13, torch.float16)
    assert unpacked.dtype == torch.float16
    assert unpacked[0, 3] == 1 and unpacked[1, 5] == 1
    assert torch.equal(unpacked.float(), torch.where(matrix < 0, -1.0, 1.0))


def test_unpack_refuses_wrong_width_or_dtype():
    packed = pack_signs(torch.randn(4, 13))
    with pytest.raises(MemtoolError, match="2 bytes per row; 17 columns need 3"):
        unpack_signs(packed, 17)
    with pytest.raises(MemtoolError, match="must be uint8"):
        unpack_signs(packed.int(), 13)


# --- reference ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("out_features", "in_features", "rank", "blocks"), [(12, 13, 3, 2), (20, 40, 16, 4)]
)
def test_reference_reconstruct_is_the_formula(out_features, in_features, rank, blocks):
    signs, packed = make_layer(out_features, in_features, rank, blocks, seed=in_features)
    u, v, s = packed["u"].double().tolist(), packed["v"].double().tolist(), signs.tolist()

    expected = torch.zeros(out_features, in_features, dtype=torch.float64)
    for j in range(blocks):  # the formula, element by element
        for o in range(out_features):
            for i in range(in_features):
                magnitude = sum(u[j][o][r] * v[j][i][r] for r in range(rank))
                expected[o, i] += s[j][o][i] * magnitude
    weight = bitstack_reconstruct(**packed)
    assert weight.dtype == torch.float32 and weight.shape == (out_features, in_features)
    torch.testing.assert_close(weight.double(), expected, rtol=1e-6, atol=1e-7)


def test_reference_linear_is_x_at_reconstructed_transposed_plus_bias():
    signs, packed = make_layer(24, 40, 5, 3, seed=3)
    weight = (signs * (packed["u"].float() @ packed["v"].float().transpose(1, 2))).sum(0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 40, generator=gen)
    bias = torch.randn(24, generator=gen)

    out = reference_linear(x, **packed, bias=bias)
    assert out.shape == (2, 3, 24) and out.dtype == torch.float32
    torch.testing.assert_close(out, x @ weight.T + bias, rtol=1e-5, atol=1e-5)

    half = reference_linear(x.half(), **packed)
    assert half.dtype == torch.float16  # computed in float32, returned in x's dtype
    torch.testing.assert_close(half, (x.half().float() @ weight.T).half())


def test_reference_refuses_tensors_that_do_not_fit():
    _, packed = make_layer(24, 40, 5, 3)
    signs, u, v = packed["signs"], packed["u"], packed["v"]
    x = torch.randn(2, 40)
    with pytest.raises(MemtoolError, match=r"u must be \[3, 24, rank\]"):
        reference_linear(x, signs, u[:2], v, 40)
    with pytest.raises(MemtoolError, match=r"v must be \[3, 40, 5\]"):
        reference_linear(x, signs, u, v[..., :4], 40)
    with pytest.raises(MemtoolError, match=r"v must be \[3, 41, 5\]"):
        reference_linear(torch.randn(2, 41), signs, u, v, 41)
    with pytest.raises(MemtoolError, match="48 inputs need 6"):
        reference_linear(torch.randn(2, 48), signs, u, torch.zeros(3, 48, 5), 48)
    with pytest.raises(MemtoolError, match="signs must be uint8"):
        reference_linear(x, signs.int(), u, v, 40)
    with pytest.raises(MemtoolError, match="expects 40 features"):
        reference_linear(torch.randn(2, 39), signs, u, v, 40)
    with pytest.raises(MemtoolError, match=r"bias must be \[24\]"):
        reference_linear(x, signs, u, v, 40, bias=torch.zeros(23))


# --- Triton kernel (interpreter) ------------------------------------------------------------


def kernel_job(
    case_id: str,
    out_features: int,
    in_features: int,
    rank: int,
    blocks: int,
    tokens: tuple[int, ...],
    bias: bool = False,
    dtype: torch.dtype = torch.float32,
    factors: torch.dtype = torch.float16,
    backend: str = "triton",
    strided: bool = False,
) -> dict:
    """One `bitstack_linear` call for the interpreter worker, its inputs seeded by the case id.

    `strided` passes the factors as transposed views (rank-major storage), to test strides.
    """
    seed = sum(map(ord, case_id))
    _, packed = make_layer(out_features, in_features, rank, blocks, seed, factors)
    if strided:
        for name in ("u", "v"):
            packed[name] = packed[name].transpose(1, 2).contiguous().transpose(1, 2)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*tokens, in_features, generator=gen).to(dtype)
    kwargs = {"x": x, **packed, "bias": torch.randn(out_features, generator=gen) if bias else None}
    return {"op": "bitstack_linear", "kwargs": kwargs, "backend": backend}


def case(out_features, in_features, rank, blocks, tokens, **options) -> dict:
    """`kernel_job` keyword arguments for a layer's sizes and the activations' leading shape."""
    sizes = {"out_features": out_features, "in_features": in_features, "rank": rank}
    return {**sizes, "blocks": blocks, "tokens": tokens, **options}


# Tiles: BLOCK_M 16 (<= 16 tokens) or 64; BLOCK_N 64 when out_features % 64 == 0, else 32;
# BLOCK_K 64 when in_features % 64 == 0, else 32; the rank padded to a power of two >= 16.
FP32_CASES = {
    # Decode: 576 inputs in nine K-tiles of 64, 96 outputs in three N-tiles of 32.
    "decode-n576-r16-j4-bias": case(96, 576, 16, 4, (1,), bias=True),
    # 13 inputs: under two bytes, one mostly masked K-tile; rank 3 padded to 16.
    "n13-r3-j2": case(40, 13, 3, 2, (3,)),
    # 200 inputs (a multiple of 8, not of 32): a ragged last K-tile; 80 tokens: two M-tiles.
    "n200-r5-j3-prefill": case(64, 200, 5, 3, (2, 40)),
    # 100 inputs (not a multiple of 8); rank 17 padded to 32; 48 outputs: a ragged N-tile.
    "n100-r17-j5-bias": case(48, 100, 17, 5, (5,), bias=True),
    "r1-j1": case(16, 24, 1, 1, (2,)),
    "r32-j2-bias": case(32, 72, 32, 2, (4,), bias=True),
    # float32 factors take the IEEE float32 magnitude dot instead of the float16 one.
    "fp32-factors": case(40, 52, 6, 3, (3,), factors=torch.float32),
    "no-tokens": case(32, 40, 4, 2, (0,)),
    "strided-factors": case(32, 40, 4, 2, (3,), strided=True),
}


# Up to FUSED_MAX_ROWS rows (1) `auto` runs the fused kernel, above it reconstructs Wᵀ for torch's
# matmul; the path-forced jobs run both on every case.
PATHS = ("fused", "reconstruct")


@pytest.fixture(scope="module")
def kernel_results(run_interpreted):
    """All kernel jobs of this module, run in one interpreter process (a few seconds)."""
    jobs = {case_id: kernel_job(case_id, **case) for case_id, case in FP32_CASES.items()}
    for case_id, case in FP32_CASES.items():  # each path on every case, whatever auto picks
        for path in PATHS:
            job = kernel_job(case_id, **case)
            job["kwargs"]["path"] = path
            jobs[f"{case_id}@{path}"] = {**job, "op": "triton_bitstack_linear"}
    bad = kernel_job("bad-path", 32, 40, 4, 2, (3,))
    bad["kwargs"]["path"] = "tiled"
    jobs["bad-path"] = {**bad, "op": "triton_bitstack_linear"}
    jobs["fp16-prefill"] = kernel_job("fp16-prefill", 48, 100, 7, 3, (40,), dtype=torch.float16)
    jobs["fp16"] = kernel_job("fp16", 48, 100, 7, 3, (5,), bias=True, dtype=torch.float16)
    jobs["fp16-decode"] = kernel_job("fp16-decode", 96, 576, 16, 4, (1,), dtype=torch.float16)
    jobs["bf16"] = kernel_job("bf16", 32, 40, 4, 2, (3,), dtype=torch.bfloat16)
    jobs["auto"] = kernel_job("auto", 32, 40, 4, 2, (3,), bias=True, backend="auto")
    bf16_auto = {"dtype": torch.bfloat16, "backend": "auto"}
    # Rows above the native CPU kernel's crossover: `auto` falls back to the reference itself.
    prefill = (CPU_MAX_ROWS_BITSTACK + 1,)
    jobs["auto-bf16"] = kernel_job("auto-bf16", 32, 40, 4, 2, prefill, **bf16_auto)
    results = run_interpreted(list(jobs.values()))
    return {
        case_id: (job, result) for (case_id, job), result in zip(jobs.items(), results, strict=True)
    }


def expected_output(job):
    return reference_linear(**{k: v for k, v in job["kwargs"].items() if k != "path"})


@pytest.mark.parametrize("path", ("auto", *PATHS))
@pytest.mark.parametrize("case_id", FP32_CASES)
def test_triton_kernel_matches_reference_fp32(kernel_results, case_id, path):
    job, result = kernel_results[case_id if path == "auto" else f"{case_id}@{path}"]
    assert result.get("backend") == "triton", result
    assert job["kwargs"]["u"].is_contiguous() != (case_id == "strided-factors")
    expected = expected_output(job)
    assert result["out"].shape == expected.shape and result["out"].dtype == torch.float32
    if expected.numel():
        assert_close_relative(result["out"], expected, FP32_RTOL)


def test_unknown_path_is_an_error(kernel_results):
    assert "unknown BitStack kernel path 'tiled'" in kernel_results["bad-path"][1]["error"]


@pytest.mark.parametrize("case_id", ["fp16", "fp16-decode", "fp16-prefill"])
def test_triton_kernel_fp16_rounds_only_the_weight(kernel_results, case_id):
    # float16 activations: the reconstructed tile is rounded to float16 for the dot, so the
    # bound is half-precision rounding of W (2**-11 relative per product), not float32's.
    job, result = kernel_results[case_id]
    assert result.get("backend") == "triton", result
    assert result["out"].dtype == torch.float16
    assert_close_relative(result["out"], expected_output(job), 2e-3)


def test_triton_refuses_bfloat16_in_the_interpreter(kernel_results):
    # triton-lang/triton#11584: the interpreter's bfloat16 dot is wrong; refuse, don't guess.
    assert "does not support bfloat16" in kernel_results["bf16"][1]["error"]


def test_auto_picks_triton_under_the_interpreter(kernel_results):
    job, result = kernel_results["auto"]
    assert result["backend"] == "triton"
    assert_close_relative(result["out"], expected_output(job), FP32_RTOL)
    job, result = kernel_results["auto-bf16"]
    assert result["backend"] == "reference"
    assert_same_reference_bfloat16(result["out"], expected_output(job))


# --- backend choice on plain CPU --------------------------------------------------------------


def test_triton_on_plain_cpu_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _, packed = make_layer(16, 24, 2, 2)
    with pytest.raises(MemtoolError, match="triton backend cannot run here"):
        bitstack_linear(torch.randn(1, 24), **packed, backend="triton")
    with pytest.raises(MemtoolError, match="unknown kernel backend"):
        bitstack_linear(torch.randn(1, 24), **packed, backend="cuda")


@pytest.mark.parametrize("backend", ["cpu", KernelBackend.CPU])
def test_cpu_backend_runs_the_native_kernel_or_says_why_not(backend):
    # The kernel itself is tested in test_cpu_bitstack.py.
    _, packed = make_layer(16, 24, 2, 2)
    x = torch.randn(1, 24, generator=torch.Generator().manual_seed(5))
    usable, _ = cpu_kernel_status()
    if not usable:
        with pytest.raises(MemtoolError, match="cpu backend cannot run here"):
            bitstack_linear(x, **packed, backend=backend)
        return
    assert_close_relative(
        bitstack_linear(x, **packed, backend=backend), reference_linear(x, **packed), FP32_RTOL
    )


def test_auto_on_plain_cpu_runs_the_reference_and_says_so(monkeypatch, caplog):
    # Above CPU_MAX_ROWS_BITSTACK rows: fewer would run the native CPU kernel.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(ops, "_logged", set())
    _, packed = make_layer(16, 24, 2, 2)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(CPU_MAX_ROWS_BITSTACK + 1, 24, generator=gen)

    assert backend_used(x.device) is KernelBackend.REFERENCE
    with caplog.at_level(logging.INFO, logger="memtool.ops"):
        out = bitstack_linear(x, **packed, backend=KernelBackend.AUTO)
        bitstack_linear(x, **packed)
        explicit = bitstack_linear(x, **packed, backend="reference")
    assert [r.getMessage() for r in caplog.records] == [
        "bitstack_linear runs on the reference backend (cpu tensors)"
    ]
    assert torch.equal(out, reference_linear(x, **packed))
    assert torch.equal(explicit, out)
