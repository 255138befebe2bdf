"""BitStack's native sign-feedback loop equals its Python specification, sign for sign.

`feedback_signs(native=False)` is the specification (`memtool.compress.bitstack`); the native
block loop (`memtool/ops/cpu/sign_feedback.cpp`) does the same float32 operations per output
row in the same order, so the signs must agree exactly (a rounding difference that flipped one
sign would show as a mismatch, and its error would spread to later columns).
"""

import pytest
import torch

import memtool.compress.bitstack as bitstack
from memtool.compress.bitstack import decompose, feedback_signs
from memtool.compress.hessian import inverse_hessian_factor


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
    expected = feedback_signs(rest, magnitude, hinv_upper, native=False)
    got = feedback_signs(rest, magnitude, hinv_upper, native=True)
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
