"""The native CPU kernel matches the reference; `auto` runs it only where it applies.

The kernel is compiled once per session (fixture `kernel`, about 30 s the first time on a
machine, then loaded from memtool's cache). Tolerance: the kernel sums the same float32
products in another order and folds the zero point in per group (`scale * (sum x q - zero *
sum x)`), so float32 results must agree to 1e-5 relative to the output's largest magnitude
(observed ~1e-6).
"""

import logging
import threading

import pytest
import torch

import memtool.ops as ops
from memtool.errors import MemtoolError
from memtool.formats.synthetic import random_gptq_layer
from memtool.ops import CPU_MAX_ROWS, KernelBackend, backend_used, gptq_backend_used, gptq_linear
from memtool.ops.cpu import build, cpu_gptq_linear, static_group_size
from memtool.ops.reference import gptq_linear as reference_linear

FP32_RTOL = 1e-5
IN, OUT = 576, 96  # groups of 128 leave a ragged last group of 64


def make_layer(
    bits: int, group_size: int = 128, shuffle: bool = False, seed: int = 0, out: int = OUT
) -> dict[str, torch.Tensor]:
    """Packed random layer `IN x out` with asymmetric zero points in `[1, 2**bits]`."""
    gen = torch.Generator().manual_seed(seed * 100 + bits)
    return random_gptq_layer(bits, IN, out, group_size, gen, shuffle=shuffle).packed


def args(packed: dict[str, torch.Tensor], bits: int) -> tuple:
    return packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], bits, IN


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.float().abs().max().clamp_min(1e-12)
    return float((actual.float() - expected.float()).abs().max() / scale)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("group_size", [128, IN], ids=["g128-ragged", "per-channel"])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_kernel_matches_reference(kernel, bits, rows, group_size, bias):
    packed = make_layer(bits, group_size)
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, IN, generator=gen)
    b = torch.randn(OUT, generator=gen) if bias else None
    b_before = None if b is None else b.clone()

    out = cpu_gptq_linear(x, *args(packed, bits), bias=b)
    expected = reference_linear(x, *args(packed, bits), bias=b)
    assert out.shape == (rows, OUT) and out.dtype == torch.float32
    assert relative_error(out, expected) <= FP32_RTOL
    if b is not None:  # the output buffer must not alias the bias (it did at one row)
        assert torch.equal(b, b_before)


@pytest.mark.parametrize("shape", [(13, IN), (2, 5, IN), (0, IN)], ids=["13rows", "3d", "empty"])
def test_kernel_handles_more_rows_and_leading_dims(kernel, shape):
    # 13 rows = a pass of 8 and a pass of 5; leading dims are flattened and restored.
    packed = make_layer(4)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(7))
    out = cpu_gptq_linear(x, *args(packed, 4), bias=torch.ones(OUT))
    expected = reference_linear(x, *args(packed, 4), bias=torch.ones(OUT))
    assert out.shape == expected.shape
    if x.numel():
        assert relative_error(out, expected) <= FP32_RTOL


@pytest.mark.parametrize("bits", [3, 4])
def test_kernel_splits_wide_layers_across_threads(kernel, bits):
    # 8 rows x 576 inputs x 1024 outputs is enough work to split (32 column strips, >= 2^20
    # multiply-adds per thread); smaller calls stay on one thread.
    packed = make_layer(bits, out=1024)
    x = torch.randn(8, IN, generator=torch.Generator().manual_seed(10))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = cpu_gptq_linear(x, *args(packed, bits))
    finally:
        torch.set_num_threads(threads)
    assert relative_error(out, reference_linear(x, *args(packed, bits))) <= FP32_RTOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_computes_half_inputs_in_float32(kernel, dtype):
    # Both paths compute in float32 and round the output once, so they differ by at most one
    # rounding of the output dtype.
    packed = make_layer(4)
    x = torch.randn(2, IN, generator=torch.Generator().manual_seed(3)).to(dtype)
    bias = torch.randn(OUT, generator=torch.Generator().manual_seed(4)).to(dtype)
    out = cpu_gptq_linear(x, *args(packed, 4), bias=bias)
    assert out.dtype == dtype
    assert relative_error(out, reference_linear(x, *args(packed, 4), bias=bias)) <= 1e-2


def test_kernel_op_passes_opcheck(kernel):
    packed = make_layer(4)
    x = torch.randn(3, IN, generator=torch.Generator().manual_seed(5))
    op_args = (x, packed["qweight"], packed["qzeros"], packed["scales"], torch.ones(OUT), 4, 128)
    torch.library.opcheck(torch.ops.memtool_cpu.gptq_gemm, op_args)


def test_static_group_size_is_found_once_per_tensor():
    g_idx = torch.arange(IN, dtype=torch.int32) // 128
    assert static_group_size(g_idx) == 128
    assert static_group_size(torch.zeros(IN, dtype=torch.int32)) == IN  # per-channel
    assert static_group_size(make_layer(4, shuffle=True)["g_idx"]) is None
    g_idx[5] = 3  # an in-place change bumps the version counter: checked again
    assert static_group_size(g_idx) is None


def test_auto_runs_the_cpu_kernel_for_decode_and_says_so(kernel, monkeypatch, caplog):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(ops, "_logged", set())
    packed = make_layer(4)
    x = torch.randn(1, IN, generator=torch.Generator().manual_seed(6))

    assert gptq_backend_used(x, packed["g_idx"], 4, IN) is KernelBackend.CPU
    with caplog.at_level(logging.INFO, logger="memtool.ops"):
        out = gptq_linear(x, *args(packed, 4))
    assert "gptq_linear runs on the cpu backend (cpu tensors)" in caplog.messages
    assert relative_error(out, reference_linear(x, *args(packed, 4))) <= FP32_RTOL


def test_auto_runs_the_reference_where_the_kernel_does_not_apply(kernel, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    shuffled = make_layer(4, shuffle=True)
    x = torch.randn(1, IN, generator=torch.Generator().manual_seed(8))
    assert gptq_backend_used(x, shuffled["g_idx"], 4, IN) is KernelBackend.REFERENCE
    assert torch.equal(gptq_linear(x, *args(shuffled, 4)), reference_linear(x, *args(shuffled, 4)))
    # Prefill-sized calls: dequantize once and use BLAS.
    static = make_layer(4)
    prefill = torch.randn(CPU_MAX_ROWS + 1, IN)
    assert gptq_backend_used(prefill, static["g_idx"], 4, IN) is KernelBackend.REFERENCE
    assert gptq_backend_used(prefill, static["g_idx"], 4, IN, "cpu") is KernelBackend.CPU


def test_asking_for_cpu_where_it_cannot_run_is_an_error(kernel):
    shuffled = make_layer(4, shuffle=True)
    with pytest.raises(MemtoolError, match="cpu backend cannot run this call: g_idx"):
        gptq_linear(torch.randn(1, IN), *args(shuffled, 4), backend="cpu")
    with pytest.raises(MemtoolError, match="cpu backend cannot run here: tensors are on cuda"):
        backend_used("cuda", "cpu")


def test_a_kernel_that_fails_to_build_warns_once_under_auto(monkeypatch, caplog):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(ops, "cpu_kernel_status", lambda: (False, "no C++ compiler (test)"))
    monkeypatch.setattr(ops, "_warned_cpu_kernel", False)
    packed = make_layer(4)
    x = torch.randn(1, IN, generator=torch.Generator().manual_seed(9))

    with caplog.at_level(logging.WARNING, logger="memtool.ops"):
        out = gptq_linear(x, *args(packed, 4))
        gptq_linear(x, *args(packed, 4))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "the native CPU kernel is unavailable (no C++ compiler (test)); using the reference"
    ]
    assert torch.equal(out, reference_linear(x, *args(packed, 4)))
    with pytest.raises(MemtoolError, match="cpu backend cannot run here: no C\\+\\+ compiler"):
        gptq_linear(x, *args(packed, 4), backend="cpu")


def test_a_missing_compiler_is_named(monkeypatch):
    monkeypatch.setenv("CXX", "memtool-no-such-compiler")
    assert build._missing_tool().startswith("no C++ compiler ('memtool-no-such-compiler'")


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_load(kernel):
    # torch waits forever for its `lock` file; a build killed mid-compile leaves one behind.
    stale = build.build_dir() / "lock"
    stale.touch()
    result = []
    loader = threading.Thread(target=lambda: result.append(build.load_kernel.__wrapped__()))
    loader.daemon = True  # torch would poll forever without the fix; do not hold pytest back
    loader.start()
    loader.join(timeout=120)
    assert result, "loading the kernel waited on a stale lock file"
    usable, reason = result[0]
    assert usable, reason
    assert not stale.exists()


def test_installs_in_other_folders_build_apart(monkeypatch, tmp_path):
    # torch rebuilds a build folder whose source paths changed: two installs sharing one
    # folder would rebuild it in turn on every switch.
    here = build.build_dir()
    monkeypatch.setattr(build, "SOURCE", tmp_path / "gptq_gemm.cpp")
    elsewhere = build.build_dir()
    assert elsewhere != here
    assert elsewhere.parent == here.parent
