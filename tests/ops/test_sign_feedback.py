"""BitStack's sign-feedback loops, native C++ and Triton, equal the Python specification.

`feedback_signs(loop="python")` is the specification (`memtool.compress.bitstack`); the native
block loop (`memtool/ops/cpu/sign_feedback.cpp`) and the Triton kernel
(`memtool/ops/triton/sign_feedback.py`, run here under `TRITON_INTERPRET=1`) do the same float32
operations per output row in the same order, so the signs must agree exactly (a rounding
difference that flipped one sign would show as a mismatch, and its error would spread to later
columns). The Triton kernel's errors may differ from the specification's by a rounding (fused
multiply-add or not), so its row errors are compared to float32 precision.
"""

import pytest
import torch

import memtool.compress.bitstack as bitstack
from memtool.compress.bitstack import decompose, feedback_signs
from memtool.compress.hessian import inverse_hessian_factor
from memtool.errors import MemtoolError


def _problem(out_features: int, in_features: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    rest = torch.randn(out_features, in_features, generator=generator)
    magnitude = torch.rand(out_features, in_features, generator=generator)
    mixing = torch.randn(in_features, in_features, generator=generator) / 8
    inputs = torch.randn(4 * in_features, in_features, generator=generator)
    inputs = inputs @ (mixing + torch.eye(in_features))
    hinv_upper, _ = inverse_hessian_factor(inputs.T @ inputs, 0.01, 1.0)
    return rest, magnitude, hinv_upper


@pytest.mark.parametrize(
    ("out_features", "in_features"),
    [(48, 64), (130, 200), (192, 576), (576, 300)],  # ragged blocks, rows not a chunk multiple
)
def test_native_feedback_signs_equal_the_specification(kernel, out_features, in_features):
    rest, magnitude, hinv_upper = _problem(out_features, in_features, seed=out_features)
    expected = feedback_signs(rest, magnitude, hinv_upper, loop="python")
    got = feedback_signs(rest, magnitude, hinv_upper, loop="cpu")
    assert torch.equal(got, expected)
    assert (got != torch.where(rest < 0, -1.0, 1.0)).any()  # the feedback did flip signs


def test_decompose_gets_the_same_blocks_with_and_without_the_native_loop(kernel, monkeypatch):
    rest, _, hinv_upper = _problem(40, 96, seed=1)
    torch.manual_seed(0)
    native, _ = decompose(rest * 0.05, niter=3, rank=2, hinv_upper=hinv_upper)
    monkeypatch.setattr(bitstack, "cpu_kernel_status", lambda: (False, "test"))
    torch.manual_seed(0)
    python, _ = decompose(rest * 0.05, niter=3, rank=2, hinv_upper=hinv_upper)
    for a, b in zip(native, python, strict=True):
        assert torch.equal(a.signs, b.signs) and torch.equal(a.u, b.u)


@pytest.mark.parametrize(
    ("out_features", "in_features", "block_size"),
    [(48, 64, 128), (130, 200, 128), (70, 150, 48)],  # ragged blocks and row tiles
)
def test_triton_feedback_signs_equal_the_specification(
    run_interpreted, out_features, in_features, block_size
):
    rest, magnitude, hinv_upper = _problem(out_features, in_features, seed=in_features)
    expected_rows = torch.zeros(out_features)
    expected = feedback_signs(
        rest, magnitude, hinv_upper, block_size, loop="python", row_error=expected_rows
    )
    kwargs = {"rest": rest, "magnitude": magnitude, "hinv_upper": hinv_upper}
    [result] = run_interpreted([{"op": "feedback_signs", "backend": "triton", "kwargs": {
        **kwargs, "block_size": block_size}}])  # fmt: skip
    assert result["backend"] == "triton"
    assert torch.equal(result["out"]["signs"], expected)
    # torch's CPU `addr_` in the specification may fuse the update's multiply-add (as the C++
    # compiler may in the native loop); numpy in the interpreter rounds twice. The errors agree
    # to float32 rounding; none of these residuals sits close enough to zero to flip a sign.
    torch.testing.assert_close(result["out"]["row_error"], expected_rows, rtol=1e-5, atol=0)
    assert (expected != torch.where(rest < 0, -1.0, 1.0)).any()  # the feedback did flip signs


def test_triton_feedback_refuses_cpu_tensors_without_the_interpreter():
    pytest.importorskip("triton")
    from memtool.ops import triton_interpreting

    if triton_interpreting():
        pytest.skip("this process runs triton in its interpreter")
    rest, magnitude, hinv_upper = _problem(8, 16, seed=0)
    with pytest.raises(MemtoolError, match="TRITON_INTERPRET=1"):
        feedback_signs(rest, magnitude, hinv_upper, loop="triton")


def test_feedback_names_an_unknown_loop():
    rest, magnitude, hinv_upper = _problem(8, 16, seed=0)
    with pytest.raises(MemtoolError, match="sign feedback loop 'gpu': choose one of python"):
        feedback_signs(rest, magnitude, hinv_upper, loop="gpu")
