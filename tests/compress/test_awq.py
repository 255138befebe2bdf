"""AWQ on tiny models: scaling preserves the function, the searches never lose to their
round-to-nearest candidate, AWQ beats RTN, and unsupported architectures are handled clearly."""

import pytest
import torch

from memtool import load_model
from memtool.compress import AWQConfig, CalibrationConfig, RTNConfig, compress
from memtool.compress.awq_groups import apply_scale, scaling_groups
from memtool.compress.awq_search import (
    channel_mean_abs,
    search_clip,
    search_scale,
    weight_mean,
)
from memtool.compress.layers import decoder_layers
from memtool.compress.quantizer import rtn_quantize
from memtool.data import calibration_windows
from memtool.errors import MemtoolError


def _calib(text_file, n=16, seq_len=64):
    return CalibrationConfig(data=str(text_file), n_samples=n, seq_len=seq_len, batch_size=4)


def _mha_llama():
    """A Llama without grouped-query attention, so v -> o is a scaling group too."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(2)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def _groups(model):
    return [(g.prev, g.linears) for g in scaling_groups(model, decoder_layers(model)[0])]


def test_scaling_groups_follow_autoawq(tiny_llama_dir, tiny_opt_dir):
    qkv = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    mlp = [("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))]
    mlp += [("mlp.up_proj", ("mlp.down_proj",))]
    # tiny llama has 2 kv heads for 4 heads: v -> o cannot be folded, so it is absent.
    assert _groups(load_model(tiny_llama_dir).model) == [("input_layernorm", qkv), *mlp]
    v_o = ("self_attn.v_proj", ("self_attn.o_proj",))
    assert _groups(_mha_llama()) == [("input_layernorm", qkv), v_o, *mlp]
    assert _groups(load_model(tiny_opt_dir).model) == [
        ("self_attn_layer_norm", qkv),
        ("self_attn.v_proj", ("self_attn.out_proj",)),
        ("final_layer_norm", ("fc1",)),
        ("fc1", ("fc2",)),
    ]


@pytest.mark.parametrize("which", ["tiny_llama_dir", "tiny_opt_dir", "mha_llama"])
def test_applying_scales_keeps_the_float_function(which, request):
    if which == "mha_llama":
        model = _mha_llama()
    else:
        model = load_model(request.getfixturevalue(which)).model
    ids = torch.randint(2, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        before = model(ids).logits
        n_groups = 0
        for layer in decoder_layers(model):
            for group in scaling_groups(model, layer):
                width = layer.get_submodule(group.linears[0]).in_features
                # Scales far from 1 (0.1 .. 10): a wrong fold would show at once.
                scales = 10 ** (torch.rand(width, generator=generator) * 2 - 1)
                apply_scale(layer, group, scales)
                n_groups += 1
        after = model(ids).logits
    assert n_groups >= 6
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_scale_search_never_loses_to_rtn_and_restores_weights(tiny_opt_dir):
    model = load_model(tiny_opt_dir).model
    fc = decoder_layers(model)[0].fc1
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, 32, generator=generator)
    x[..., :3] *= 20  # a few salient input channels, as in real activations
    calls = [((batch,), {}) for batch in x]
    original = fc.weight.detach().clone()

    def fake(w):
        return rtn_quantize(w, 3, 16, False).dequantize()

    best, alpha, error = search_scale([fc], fc, calls, channel_mean_abs(x), fake)
    _, _, rtn_error = search_scale([fc], fc, calls, channel_mean_abs(x), fake, n_grid=1)
    assert torch.equal(fc.weight, original)
    assert alpha > 0 and error < rtn_error
    assert best[:3].min() > best[3:].max()  # the salient channels are scaled up the most


def test_duo_scaling_weight_mean_is_per_group_relative_magnitude():
    # Groups of 2 columns, the last one ragged: |w| / max |w| of its (row, group), then the
    # mean over rows: row 0 gives [1/2, 1 | 1], row 1 gives [1, 1 | 1].
    w = torch.tensor([[1.0, -2.0, 3.0], [4.0, 4.0, -1.0]])
    torch.testing.assert_close(weight_mean([w], 2), torch.tensor([0.75, 1.0, 1.0]))
    # Linears sharing an input are stacked: their rows all count.
    torch.testing.assert_close(weight_mean([w[:1], w[1:]], 2), weight_mean([w], 2))


def test_clip_search_never_loses_to_no_clipping():
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=generator) * 0.05
    w[::5, 7] = 0.6  # outlier weights that stretch their rows' ranges
    x = torch.randn(512, 64, generator=generator)

    def error(weight):
        q = rtn_quantize(weight, 3, -1, False).dequantize()
        return (x @ q.T - x @ w.T).pow(2).mean(dim=0)

    clipped = search_clip(w, x, bits=3, group_size=-1, sym=False)
    assert (error(clipped) <= error(w) + 1e-9).all()
    assert (clipped.abs().amax(dim=1) < w.abs().amax(dim=1)).any()


def _logit_mse(reference, model, windows):
    with torch.no_grad():
        return (reference(windows).logits - model(windows).logits).pow(2).mean().item()


@pytest.mark.parametrize("model_dir", ["tiny_llama_dir", "tiny_opt_dir"])
@pytest.mark.parametrize(("bits", "dtype"), [(3, "float32"), (4, "float32"), (3, "bfloat16")])
def test_awq_beats_rtn_on_tiny_models(
    model_dir, bits, dtype, request, text_file, held_out_text_file
):
    folder = request.getfixturevalue(model_dir)
    reference = load_model(folder)
    windows = calibration_windows(
        str(held_out_text_file), reference.tokenizer, 8, 32, seed=0
    ).input_ids
    errors = {}
    awq = AWQConfig(bits, 32, stats_dtype=dtype)
    for config in (RTNConfig(bits=bits, group_size=32, sym=False), awq):
        _, weights, loaded = compress(str(folder), config, _calib(text_file), show_progress=False)
        n_linears = sum(isinstance(m, torch.nn.Linear) for m in loaded.model.modules()) - 1
        assert len(weights) == n_linears  # every decoder linear, not the head
        errors[config.method] = _logit_mse(reference.model, loaded.model, windows)
    assert errors["awq"] < errors["rtn"]


def _neox_dir(tiny_tokenizer, tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(3)
    config = GPTNeoXConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
    )
    folder = tmp_path / "neox"
    GPTNeoXForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def test_unknown_architecture_is_refused_by_name(tiny_tokenizer, tmp_path, text_file):
    folder = _neox_dir(tiny_tokenizer, tmp_path)
    with pytest.raises(MemtoolError, match="no scaling groups for model_type 'gpt_neox'"):
        compress(str(folder), AWQConfig(group_size=32), _calib(text_file), show_progress=False)


def test_fallback_rtn_quantizes_with_rtn_and_says_so(tiny_tokenizer, tmp_path):
    folder = _neox_dir(tiny_tokenizer, tmp_path)
    config = AWQConfig(bits=4, group_size=32, fallback_rtn=True)
    result, weights, _ = compress(str(folder), config, show_progress=False)
    assert any("round-to-nearest" in warning for warning in result.warnings)
    assert result.calibration is None
    original = load_model(folder).model.state_dict()
    assert len(weights) == 8  # qkv, dense, h_to_4h, 4h_to_h in 2 layers
    for name, weight in weights.items():
        rtn = rtn_quantize(original[f"{name}.weight"], 4, 32, sym=False)
        assert torch.equal(weight.codes, rtn.codes) and torch.equal(weight.scales, rtn.scales)


def test_bfloat16_search_runs_its_block_forwards_in_bfloat16(tiny_llama_dir, text_file):
    from memtool.compress.awq import quantize_awq

    loaded = load_model(tiny_llama_dir)
    windows = calibration_windows(str(text_file), loaded.tokenizer, 4, 32, seed=0).input_ids
    seen = set()
    mlp = decoder_layers(loaded.model)[1].mlp
    handle = mlp.down_proj.register_forward_hook(lambda m, args, out: seen.add(out.dtype))
    result = quantize_awq(
        loaded.model, windows, AWQConfig(4, 32), 2, False, compute_dtype=torch.bfloat16
    )
    handle.remove()
    assert seen == {torch.bfloat16} and len(result.weights) == 2 * 7
    assert all(w.scales.dtype == torch.float32 for w in result.weights.values())
