"""Assertions the kernel tests share (imported by name: pytest puts this folder on the path)."""

import torch


def assert_close_relative(actual, expected, rtol):
    scale = expected.float().abs().max().clamp_min(1e-12)
    error = (actual.float() - expected.float()).abs().max() / scale
    assert error <= rtol, f"max error {error:.2e} relative to max |expected|, allowed {rtol:.0e}"


def assert_same_reference_bfloat16(actual, expected):
    """`actual`, a reference op's bfloat16 output from the interpreter's child process, against
    `expected` computed here by the same code. Not bit for bit: the float32 GEMM inside is not
    reproducible across the two processes on every CPU (on an AVX-512 Xeon 1 of 384 outputs
    differed; a BLAS may pick its kernel by the inputs' alignment, and the child's come from
    `torch.load`), and a last-bit difference can round to the neighbouring bfloat16 value. At
    most 1% of the outputs, one bfloat16 step."""
    assert actual.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(actual, expected, rtol=2**-7, atol=1e-6)
    assert (actual != expected).float().mean() <= 0.01
