"""GPTQ against round-to-nearest on the loss GPTQ minimises: ||XWᵀ - XŴᵀ||²."""

import pytest
import torch

from memtool import load_model
from memtool.compress.gptq import gptq_quantize
from memtool.compress.hessian import HessianCollector, add_second_moment
from memtool.compress.layers import LayerInputs, linear_children
from memtool.compress.quantizer import rtn_quantize
from memtool.models.layers import decoder_layers


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
    ordered = gptq_quantize(w, hessian, 3, 64, True, act_order=True, static_groups=True)
    assert torch.equal(ordered.weight.g_idx, torch.arange(256, dtype=torch.int32) // 64)
    assert _output_error(x, w, ordered.weight.dequantize()) <= 1.05 * _output_error(
        x, w, plain.weight.dequantize()
    )


@pytest.mark.parametrize("group_size", [64, 96])  # 96: a ragged last group of 64
def test_dynamic_act_order_groups_follow_the_quantization_order(group_size):
    x, w, hessian = _problem(seed=1)
    result = gptq_quantize(w, hessian, 3, group_size, True, act_order=True, static_groups=False)
    order = torch.argsort(torch.diag(hessian), descending=True)
    # The i-th column quantized belongs to group i // group_size.
    assert torch.equal(result.weight.g_idx[order].long(), torch.arange(256) // group_size)
    rtn = rtn_quantize(w, 3, group_size, True)
    assert _output_error(x, w, result.weight.dequantize()) < 0.8 * _output_error(
        x, w, rtn.dequantize()
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


@pytest.mark.parametrize("width", [64, 576, 1000])
def test_second_moment_is_the_symmetric_mean_of_xxt(width):
    gen = torch.Generator().manual_seed(width)
    batches = [torch.randn(2, 37, width, generator=gen) for _ in range(3)]
    matrix, rows = torch.zeros(width, width), 0
    for x in batches:
        rows = add_second_moment(matrix, rows, x, factor=2.0)
    flat = torch.cat([x.reshape(-1, width) for x in batches]).double()
    torch.testing.assert_close(matrix.double(), 2 * flat.T @ flat / rows, rtol=1e-5, atol=1e-5)
    assert rows == 3 * 2 * 37


def test_hessian_pass_stops_at_the_last_linear(tiny_llama_dir):
    model = load_model(tiny_llama_dir).model
    layer = decoder_layers(model)[0]
    linears = linear_children(layer)
    last_name, last = list(linears.items())[-1]
    gen = torch.Generator().manual_seed(0)
    hidden = [torch.randn(2, 8, model.config.hidden_size, generator=gen) for _ in range(2)]
    position = model.model.rotary_emb(hidden[0], torch.arange(8)[None])
    inputs = LayerInputs(hidden, [{"position_embeddings": position}] * 2)
    seen = []  # the last linear's inputs in full forwards, and whether its product ran
    handle = last.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    inputs.run(layer)
    handle.remove()
    ran = []
    handle = last.register_forward_hook(lambda *_: ran.append(1))
    with torch.no_grad(), HessianCollector(linears) as collector:
        inputs.run(layer)
    handle.remove()
    assert not ran  # the pass ended before the last linear's product
    group = next(g for g in collector.groups if last_name in g.names)
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen]).double()
    assert group.n_rows == x.shape[0] == 2 * 2 * 8
    torch.testing.assert_close(
        group.hessian.double(), 2 * x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6
    )
