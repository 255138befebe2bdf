"""GPTQ against round-to-nearest on the loss GPTQ minimises: ||XWᵀ - XŴᵀ||²."""

import pytest
import torch

from memtool.compress.gptq import gptq_quantize
from memtool.compress.quantizer import rtn_quantize


def _problem(seed=0, n=2048, d_in=256, d_out=96):
    generator = torch.Generator().manual_seed(seed)
    # Correlated inputs with a few large channels, as in real activations.
    mix = torch.randn(d_in, d_in, generator=generator) / d_in**0.5
    x = torch.randn(n, d_in, generator=generator) @ (torch.eye(d_in) + mix)
    x[:, :8] *= 8
    w = torch.randn(d_out, d_in, generator=generator) * 0.05
    hessian = 2 * x.T @ x / n
    return x, w, hessian


def _output_error(x, w, w_hat):
    return (x @ (w - w_hat).T).pow(2).mean().item()


@pytest.mark.parametrize(("bits", "group_size"), [(4, 128), (3, 128), (2, 64), (4, -1)])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_beats_rtn(bits, group_size, sym):
    x, w, hessian = _problem()
    gptq = gptq_quantize(w, hessian, bits, group_size, sym)
    rtn = rtn_quantize(w, bits, group_size, sym)
    assert gptq.fallback_reason is None and gptq.damp_percent == 0.01
    assert _output_error(x, w, gptq.weight.dequantize()) < 0.8 * _output_error(
        x, w, rtn.dequantize()
    )


def test_act_order_keeps_static_groups_and_helps():
    x, w, hessian = _problem(seed=1)
    plain = gptq_quantize(w, hessian, 3, 64, True)
    ordered = gptq_quantize(w, hessian, 3, 64, True, act_order=True)
    assert torch.equal(ordered.weight.g_idx, torch.arange(256, dtype=torch.int32) // 64)
    assert _output_error(x, w, ordered.weight.dequantize()) <= 1.05 * _output_error(
        x, w, plain.weight.dequantize()
    )


def test_dead_inputs_get_zero_weight():
    _x, w, hessian = _problem()
    hessian[5, :] = 0
    hessian[:, 5] = 0
    result = gptq_quantize(w, hessian, 4, 128, True)
    assert torch.all(result.weight.dequantize()[:, 5] == 0)


def test_indefinite_hessian_increases_damping_then_falls_back():
    _, w, hessian = _problem()
    near_singular = hessian.clone()
    # A 2x2 block with off-diagonal above its diagonal: slightly indefinite, fixed by damping.
    near_singular[100, 101] = near_singular[101, 100] = near_singular[100, 100] * 1.05
    damped = gptq_quantize(w, near_singular, 4, 128, True)
    assert damped.fallback_reason is None and damped.damp_percent > 0.01
    broken = -torch.eye(256)  # negative definite: no dampening up to the cap fixes it
    result = gptq_quantize(w, broken, 4, 128, True, max_damp_percent=0.1)
    assert result.fallback_reason and "positive definite" in result.fallback_reason
    assert torch.equal(result.weight.codes, rtn_quantize(w, 4, 128, True).codes)
