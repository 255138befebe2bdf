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


def test_bfloat16_forwards_keep_hidden_states_in_bfloat16_and_float32_hessians_close(
    tiny_llama_dir,
):
    """compute_dtype=bfloat16: the layer matmuls run in bfloat16, the hidden states are kept in
    it between layers but enter each layer in float32, and the Hessians stay float32, close to
    the float32 pass's."""
    windows = torch.randint(2, 300, (4, 16), generator=torch.Generator().manual_seed(2))
    hessians, seen = {}, []
    for dtype in (None, torch.bfloat16):
        model = load_model(tiny_llama_dir).model
        layer1 = decoder_layers(model)[1]
        handles = [
            layer1.mlp.down_proj.register_forward_hook(
                lambda m, args, out, dtype=dtype: seen.append(("matmul", dtype, out.dtype))
            ),
            layer1.register_forward_pre_hook(
                lambda m, args, dtype=dtype: seen.append(("enters", dtype, args[0].dtype))
            ),
        ]
        hessians[dtype] = []
        result = quantize_sequential(
            model, windows, _recording_rtn(hessians[dtype]), 2, False, compute_dtype=dtype
        )
        for handle in handles:
            handle.remove()
        assert len(result.weights) == 2 * 7
    assert {s for s in seen if s[1] is None} == {
        ("matmul", None, torch.float32),
        ("enters", None, torch.float32),
    }
    assert {s for s in seen if s[1] is torch.bfloat16} == {
        ("matmul", torch.bfloat16, torch.bfloat16),
        ("enters", torch.bfloat16, torch.float32),
    }
    assert len(hessians[None]) == len(hessians[torch.bfloat16]) == 2 * 4
    for (names, want), (got_names, got) in zip(
        hessians[None], hessians[torch.bfloat16], strict=True
    ):
        assert names == got_names and got.dtype == torch.float32
        error = (got - want).norm() / want.norm()
        assert 0 < error < 0.02, (names, error)  # bfloat16 really ran, and stayed close


def test_layer_inputs_kept_in_the_compute_dtype(tiny_llama_dir):
    windows = torch.randint(2, 300, (4, 16), generator=torch.Generator().manual_seed(2))
    model = load_model(tiny_llama_dir).model
    inputs = capture_first_layer_inputs(model, windows, 2)
    want = [h.clone() for h in inputs.hidden]
    assert all(h.dtype == torch.float32 for h in want)
    inputs.set_compute_dtype(torch.bfloat16)
    assert all(h.dtype == torch.bfloat16 for h in inputs.hidden)
    for got, original in zip(inputs.hidden, want, strict=True):
        assert torch.equal(got, original.bfloat16())
    with torch.no_grad():
        inputs.advance(decoder_layers(model)[0])
    assert all(h.dtype == torch.bfloat16 for h in inputs.hidden)
