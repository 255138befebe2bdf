"""GPTQ ops: the reference is the formula; the Triton kernel matches the reference.

Kernel tests run the Triton interpreter on CPU tensors in one child process (fixture
`run_interpreted`, see conftest.py). Tolerance: the kernel sums the same float32 products in
another order (K-tiles of 32/64), so float32 results must agree to 1e-4 relative to the
output's largest magnitude (observed ~1e-6).
"""

import logging

import pytest
import torch
from kernel_checks import assert_close_relative, assert_same_reference_bfloat16

import memtool.ops as ops
from memtool.errors import MemtoolError
from memtool.formats.synthetic import random_gptq_layer
from memtool.ops import KernelBackend, backend_used, gptq_linear
from memtool.ops.reference import dequantize_gptq
from memtool.ops.reference import gptq_linear as reference_linear

BITS = (2, 3, 4, 8)
FP32_RTOL = 1e-4


def make_layer(bits, in_features=576, out_features=96, group_size=128, sym=False, shuffle=False):
    """Random layer; returns `(q, zeros, scales_fp16, g_idx)` and the packed tensors."""
    gen = torch.Generator().manual_seed(bits * 7 + in_features + 2 * sym + shuffle)
    layer = random_gptq_layer(
        bits, in_features, out_features, group_size, gen, sym=sym, shuffle=shuffle
    )
    return (layer.q, layer.zeros, layer.packed["scales"], layer.g_idx), layer.packed


def packed_args(packed, bits, in_features=576):
    return packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], bits, in_features


@pytest.mark.parametrize("shuffle", [False, True], ids=["static-groups", "shuffled-g_idx"])
@pytest.mark.parametrize("bits", BITS)
def test_reference_dequantize_is_the_formula(bits, shuffle):
    (q, zeros, scales, g_idx), packed = make_layer(bits, shuffle=shuffle)
    weight = dequantize_gptq(*packed_args(packed, bits))

    expected = torch.empty(576, 96)
    for i in range(576):  # the formula, row by row, with the group each row names
        g = int(g_idx[i])
        expected[i] = scales[g].float() * (q[i] - zeros[g]).float()
    assert weight.dtype == torch.float32
    assert torch.equal(weight, expected)


@pytest.mark.parametrize("bits", (3, 4))
def test_reference_linear_is_x_at_dequantized_plus_bias(bits):
    _, packed = make_layer(bits, shuffle=True)
    weight = dequantize_gptq(*packed_args(packed, bits))
    x = torch.randn(2, 3, 576, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(96, generator=torch.Generator().manual_seed(2))

    out = reference_linear(x, *packed_args(packed, bits), bias=bias)
    assert out.shape == (2, 3, 96) and out.dtype == torch.float32
    torch.testing.assert_close(out, x @ weight + bias, rtol=1e-5, atol=1e-5)

    half = reference_linear(x.half(), *packed_args(packed, bits))
    assert half.dtype == torch.float16  # computed in float32, returned in x's dtype
    torch.testing.assert_close(half, (x.half().float() @ weight).half())


def test_reference_refuses_activations_that_do_not_fit():
    _, packed = make_layer(4)
    with pytest.raises(MemtoolError, match="expects 576 features"):
        reference_linear(torch.randn(2, 512), *packed_args(packed, 4))
    with pytest.raises(MemtoolError, match=r"bias must be \[96\]"):
        reference_linear(torch.randn(2, 576), *packed_args(packed, 4), bias=torch.zeros(95))
    with pytest.raises(MemtoolError, match="qweight must be"):
        reference_linear(torch.randn(2, 608), *packed_args(packed, 4, in_features=608))


def kernel_job(
    case_id: str,
    bits: int,
    shape: tuple[int, ...],
    bias: bool = False,
    sym: bool = False,
    shuffle: bool = False,
    in_features: int = 576,
    group_size: int = 128,
    dtype: torch.dtype = torch.float32,
    backend: str = "triton",
) -> dict:
    """One `gptq_linear` call for the interpreter worker, its inputs seeded by the case id."""
    _, packed = make_layer(bits, in_features, 96, group_size, sym=sym, shuffle=shuffle)
    gen = torch.Generator().manual_seed(sum(map(ord, case_id)))
    x = torch.randn(*shape[:-1], in_features, generator=gen).to(dtype)
    kwargs = {"x": x, **packed, "bits": bits, "in_features": in_features}
    kwargs["bias"] = torch.randn(96, generator=gen) if bias else None
    return {"kwargs": kwargs, "backend": backend}


# Default layer: 576 in-features in groups of 128 (the last ragged, 64 wide), 96 out-features,
# so K-tiles of 64 cross group borders and N needs three 32-wide tiles.
FP32_CASES = {
    **{
        f"decode-{b}bit-bias-actorder": {
            "bits": b,
            "shape": (1, 576),
            "bias": True,
            "shuffle": True,
        }
        for b in BITS
    },
    # M = 80: two M-tiles of 64, the second mostly masked.
    **{f"prefill-{b}bit-sym": {"bits": b, "shape": (2, 40, 576), "sym": True} for b in BITS},
    "m5-3bit-bias-sym-actorder": {
        "bits": 3,
        "shape": (5, 576),
        "bias": True,
        "sym": True,
        "shuffle": True,
    },
    # K = 160 is not a multiple of 64: K-tiles of 32; groups of 64 with a ragged last one.
    "k160-g64-3bit": {"bits": 3, "shape": (3, 160), "in_features": 160, "group_size": 64},
}


@pytest.fixture(scope="module")
def kernel_results(run_interpreted):
    """All kernel jobs of this module, run in one interpreter process (about 5 s)."""
    jobs = {case_id: kernel_job(case_id, **case) for case_id, case in FP32_CASES.items()}
    jobs["fp16"] = kernel_job("fp16", 4, (3, 576), bias=True, dtype=torch.float16)
    jobs["bf16"] = kernel_job("bf16", 4, (3, 576), dtype=torch.bfloat16)
    jobs["auto"] = kernel_job("auto", 8, (4, 576), bias=True, shuffle=True, backend="auto")
    bf16_auto = {"dtype": torch.bfloat16, "backend": "auto"}
    jobs["auto-bf16"] = kernel_job("auto-bf16", 8, (4, 576), **bf16_auto)
    results = run_interpreted(list(jobs.values()))
    return {
        case_id: (job, result) for (case_id, job), result in zip(jobs.items(), results, strict=True)
    }


def expected_output(job):
    return reference_linear(**job["kwargs"])


@pytest.mark.parametrize("case_id", FP32_CASES)
def test_triton_kernel_matches_reference_fp32(kernel_results, case_id):
    job, result = kernel_results[case_id]
    assert result.get("backend") == "triton", result
    expected = expected_output(job)
    assert result["out"].shape == expected.shape and result["out"].dtype == torch.float32
    assert_close_relative(result["out"], expected, FP32_RTOL)


def test_triton_kernel_fp16_rounds_only_the_weight(kernel_results):
    # float16 activations: the dequantized tile is rounded to float16 for the dot, so the
    # bound is half-precision rounding of W (2**-11 relative per product), not float32's.
    job, result = kernel_results["fp16"]
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


def test_triton_on_plain_cpu_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _, packed = make_layer(4)
    with pytest.raises(MemtoolError, match="triton backend cannot run here"):
        gptq_linear(torch.randn(1, 576), *packed_args(packed, 4), backend="triton")
    with pytest.raises(MemtoolError, match="unknown kernel backend"):
        backend_used("cpu", "cuda")


def test_auto_on_plain_cpu_runs_the_reference_and_says_so(monkeypatch, caplog):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(ops, "_logged", set())
    _, packed = make_layer(4, shuffle=True)  # act-order g_idx: the native CPU kernel does not apply
    x = torch.randn(2, 576, generator=torch.Generator().manual_seed(4))

    assert backend_used(x.device) is KernelBackend.REFERENCE
    with caplog.at_level(logging.INFO, logger="memtool.ops"):
        out = gptq_linear(x, *packed_args(packed, 4), backend=KernelBackend.AUTO)
        gptq_linear(x, *packed_args(packed, 4))
    assert [r.getMessage() for r in caplog.records] == [
        "gptq_linear runs on the reference backend (cpu tensors)"
    ]
    assert torch.equal(out, reference_linear(x, *packed_args(packed, 4)))


# --- the Triton entry point's two paths ----------------------------------------------------
# Decode-sized calls run the GEMV kernel (packed words unpacked by shifts for 2/4/8 bits, per
# row for 3; one scale row per K-step where the step sits in one group, per element where
# act-order mixes groups), larger ones dequantize once and call torch's matmul. Both are run
# here on every layout, whatever `auto` would pick for the shape.

PATH_CASES = {
    f"{path}-{b}bit-{layout}-m{rows}": {
        "bits": b,
        "rows": rows,
        "path": path,
        "shuffle": layout == "actorder",
        "sym": b == 8,
    }
    for path in ("gemv", "dequant")
    for b in BITS
    for layout in ("static", "actorder")
    # 16 rows of 96 columns fill the interpreter's pretend processors: one split, no atomics.
    for rows in ((1, 16) if path == "gemv" and b == 4 else (1,) if path == "gemv" else (3,))
}
# Tiles that make static groups of 64 look mixed (K-steps of 128 span two groups) and columns
# of 32: the per-element path on a checkpoint without act-order, still exact.
TILE_CASES = {
    "gemv-4bit-g64-steps128": {"bits": 4, "group_size": 64, "tiles": (1, 32, 128, 4)},
    "gemv-3bit-g64-steps16": {"bits": 3, "group_size": 64, "tiles": (1, 32, 16, 2)},
}


def path_job(case_id, bits, rows, path="gemv", shuffle=False, sym=False, group_size=128,
             tiles=None, dtype=torch.float32) -> dict:  # fmt: skip
    job = kernel_job(case_id, bits, (rows, 576), bias=True, sym=sym, shuffle=shuffle,
                     group_size=group_size, dtype=dtype)  # fmt: skip
    job["kwargs"].update(path=path, tiles=tiles)
    return {**job, "op": "triton_gptq_linear"}


@pytest.fixture(scope="module")
def path_results(run_interpreted):
    jobs = {case_id: path_job(case_id, **case) for case_id, case in PATH_CASES.items()}
    jobs |= {case_id: path_job(case_id, rows=2, **case) for case_id, case in TILE_CASES.items()}
    jobs["gemv-fp16"] = path_job("gemv-fp16", 4, 2, dtype=torch.float16)
    jobs["dequant-fp16"] = path_job("dequant-fp16", 4, 2, path="dequant", dtype=torch.float16)
    jobs["bad-path"] = path_job("bad-path", 4, 1, path="fused")
    for bits in BITS:
        _, packed = make_layer(bits, shuffle=True)
        for dtype in (torch.float32, torch.float16):
            kwargs = {**packed, "bits": bits, "in_features": 576, "dtype": dtype}
            jobs[f"dequantize-{bits}-{dtype}"] = {
                "kwargs": kwargs, "backend": "triton", "op": "triton_dequantize_gptq"
            }  # fmt: skip
    results = run_interpreted(list(jobs.values()))
    return dict(zip(jobs, zip(jobs.values(), results, strict=True), strict=True))


@pytest.mark.parametrize("case_id", [*PATH_CASES, *TILE_CASES])
def test_both_paths_match_the_reference_on_every_layout(path_results, case_id):
    job, result = path_results[case_id]
    assert "out" in result, result
    kwargs = {k: v for k, v in job["kwargs"].items() if k not in ("path", "tiles")}
    expected = reference_linear(**kwargs)
    assert result["out"].shape == expected.shape and result["out"].dtype == torch.float32
    assert_close_relative(result["out"], expected, FP32_RTOL)


def test_gemv_sums_float16_calls_in_float32_from_the_exact_weight(path_results):
    # GEMV never rounds W: only the output's float16 rounding separates it from the reference.
    job, result = path_results["gemv-fp16"]
    kwargs = {k: v for k, v in job["kwargs"].items() if k not in ("path", "tiles")}
    assert result["out"].dtype == torch.float16
    assert_close_relative(result["out"], reference_linear(**kwargs), 1e-3)
    job, result = path_results["dequant-fp16"]  # W rounded to float16 first
    kwargs = {k: v for k, v in job["kwargs"].items() if k not in ("path", "tiles")}
    assert_close_relative(result["out"], reference_linear(**kwargs), 2e-3)


def test_unknown_path_is_an_error(path_results):
    assert "unknown GPTQ kernel path 'fused'" in path_results["bad-path"][1]["error"]


@pytest.mark.parametrize("bits", BITS)
def test_triton_dequantize_is_the_reference_dequantize(path_results, bits):
    for dtype in (torch.float32, torch.float16):
        job, result = path_results[f"dequantize-{bits}-{dtype}"]
        kwargs = {k: v for k, v in job["kwargs"].items() if k != "dtype"}
        expected = dequantize_gptq(**kwargs).to(dtype)
        assert result["out"].dtype == dtype
        assert torch.equal(result["out"], expected)  # the same one rounding per weight


def test_k_splits_until_the_processors_are_busy():
    tiles_module = pytest.importorskip("memtool.ops.triton.tiles")
    from memtool.ops.triton.tiles import PROGRAMS_PER_SM, k_splits

    cuda = torch.device("cuda")
    with pytest.MonkeyPatch.context() as patch:  # an H100/H200's 132 multiprocessors
        patch.setattr(tiles_module, "multiprocessors", lambda device: 132)
        # One row of 4096 x 4096 in 64 column tiles, K-steps of 128: 1056 programs wanted.
        splits, steps = k_splits(64, 4096, 128, cuda)
        assert (splits, steps) == (16, 2)
        assert 64 * splits >= PROGRAMS_PER_SM * 132 // 2
        # Enough output tiles already: no split, so no atomics.
        assert k_splits(8 * 11008 * 16 // 64, 4096, 128, cuda) == (1, 32)
        # Never more splits than K-steps; ragged K rounds the steps up.
        assert k_splits(1, 200, 128, cuda) == (2, 1)


def test_auto_runs_gemv_for_single_rows_except_at_3_bits():
    # The choice the H200 timings support (see GEMV_MAX_ROWS); forced paths are obeyed.
    pytest.importorskip("triton")
    from memtool.ops.triton.gptq_matmul import use_gemv

    assert use_gemv(1, 4) and use_gemv(1, 2) and use_gemv(1, 8)
    assert not use_gemv(2, 4) and not use_gemv(1, 3)
    assert use_gemv(300, 3, "gemv") and not use_gemv(1, 4, "dequant")


def test_grid_arithmetic_is_plain_integer_math():
    from memtool.ops.triton.launch import ceil_div, next_power_of_2

    for a in range(0, 300, 7):
        for b in (1, 2, 3, 16, 64, 128):
            assert ceil_div(a, b) == -(-a // b) == (a + b - 1) // b
    assert [next_power_of_2(n) for n in (0, 1, 2, 3, 4, 5, 16, 17, 1000)] == [
        1, 1, 2, 4, 4, 8, 16, 32, 1024,
    ]  # fmt: skip
