"""The layer-by-layer driver: which inputs each group of linears is calibrated on."""

import copy

import pytest
import torch

from memtool import load_model
from memtool.compress.hessian import HessianCollector
from memtool.compress.layers import capture_first_layer_inputs, linear_children, run_layer
from memtool.compress.quantizer import rtn_quantize
from memtool.compress.sequential import quantize_sequential
from memtool.models.layers import decoder_layers


def _recording_rtn(seen: list):
    """A group quantizer that records each group's Hessian (2-bit RTN, so the weights written
    back differ clearly from the originals)."""

    def quantize(modules, group):
        seen.append((tuple(group.names), group.hessian.clone()))
        return [rtn_quantize(m.weight.detach().float(), 2, 32, True) for m in modules], []

    return quantize


def _input_hessian(layer, inputs, linear) -> torch.Tensor:
    """2 XᵀX / n of what reaches `linear` when `inputs` run through `layer` as it is."""
    rows = []
    handle = linear.register_forward_pre_hook(lambda m, args: rows.append(args[0].detach()))
    with torch.no_grad():
        for hidden, kwargs in zip(inputs.hidden, inputs.kwargs, strict=True):
            run_layer(layer, hidden, kwargs)
    handle.remove()
    x = torch.cat([r.reshape(-1, r.shape[-1]) for r in rows]).double()
    return 2 * x.T @ x / x.shape[0]


@pytest.mark.parametrize("true_sequential", [True, False])
def test_true_sequential_calibrates_each_group_through_those_quantized_before(
    tiny_llama_dir, true_sequential
):
    windows = torch.randint(2, 300, (4, 16), generator=torch.Generator().manual_seed(2))
    model = load_model(tiny_llama_dir).model
    original_layer = copy.deepcopy(decoder_layers(model)[0])
    inputs = capture_first_layer_inputs(model, windows, 2)
    seen = []
    result = quantize_sequential(
        model, windows, _recording_rtn(seen), 2, False, true_sequential=true_sequential
    )
    assert [names for names, _ in seen[:4]] == [
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ]
    assert len(seen) == 2 * 4 and len(result.weights) == 2 * 7  # 2 layers, 4 groups, 7 linears
    layer0 = dict(seen[:4])
    # Expected: down_proj's input computed through the quantized q/k/v, o, gate and up
    # (true sequential), or through the original layer (one pass).
    layer = copy.deepcopy(original_layer)
    if true_sequential:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            key = f"model.layers.0.self_attn.{name}"
            layer.self_attn.get_submodule(name).weight.data = result.weights[key].dequantize()
        for name in ("gate_proj", "up_proj"):
            key = f"model.layers.0.mlp.{name}"
            layer.mlp.get_submodule(name).weight.data = result.weights[key].dequantize()
    for names, linear in [
        (("self_attn.o_proj",), layer.self_attn.o_proj),
        (("mlp.down_proj",), layer.mlp.down_proj),
    ]:
        want = _input_hessian(layer, inputs, linear)
        torch.testing.assert_close(layer0[names].double(), want, rtol=1e-4, atol=1e-5)
    if true_sequential:  # the modes differ here, so the comparison above tells them apart
        unquantized = _input_hessian(original_layer, inputs, original_layer.mlp.down_proj)
        assert not torch.allclose(layer0[("mlp.down_proj",)].double(), unquantized, rtol=1e-2)


def test_one_group_pass_ends_at_the_next_group(tiny_llama_dir):
    """`max_groups=1` records q/k/v only, and no batch's forward goes past them."""
    windows = torch.randint(2, 300, (4, 16), generator=torch.Generator().manual_seed(2))
    model = load_model(tiny_llama_dir).model
    inputs = capture_first_layer_inputs(model, windows, 2)
    layer = decoder_layers(model)[0]
    ran = []
    handle = layer.self_attn.o_proj.register_forward_hook(lambda *_: ran.append(1))
    with torch.no_grad(), HessianCollector(linear_children(layer), max_groups=1) as collector:
        inputs.run(layer)
    handle.remove()
    assert not ran
    [group] = collector.groups
    assert group.names == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    assert group.n_rows == 4 * 16


def test_the_pass_runs_with_large_allocations_mapped(tiny_llama_dir, monkeypatch):
    """The pass's temporaries come from their own mappings (issue 4's peak memory: 1,076 ->
    945 MB on the default model's 32-window job); glibc's setting is put back after it."""
    import contextlib

    import memtool.compress.sequential as sequential

    states = []

    @contextlib.contextmanager
    def recording(*args, **kwargs):
        states.append("entered")
        yield
        states.append("left")

    def quantize(modules, group):
        states.append("quantized")
        return [rtn_quantize(m.weight.detach().float(), 4, 32, True) for m in modules], []

    monkeypatch.setattr(sequential, "large_allocations_mapped", recording)
    windows = torch.randint(2, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    quantize_sequential(load_model(tiny_llama_dir).model, windows, quantize, 2, False)
    assert states[0] == "entered" and states[-1] == "left"
    assert states.count("entered") == 1 and "quantized" in states[1:-1]
