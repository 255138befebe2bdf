"""The native one-token bundle FFN equals FlashFFN's torch code (its specification).

`FlashFFN._compute` with `native=False` is the specification; with `native=True` one token on
CPU goes through `bundle_ffn` (memtool/ops/cpu/bundle_ffn.cpp), which sums in float32 where the
torch code rounds to the bundles' dtype between steps: equal to rounding.
"""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from memtool.serve.flash.ffn import FlashFFN

HIDDEN = 72  # not a multiple of the kernel's 16 lanes or of F16C's 8


def _ffn(kind: str, parts: list[tuple[str, int]], threshold: float | None) -> FlashFFN:
    """A FlashFFN with just what `_compute` reads (the store's layout of one bundle)."""
    ffn = object.__new__(FlashFFN)
    nn.Module.__init__(ffn)
    ffn.kind = kind
    ffn.act = nn.ReLU() if kind == "relu" else nn.SiLU()
    ffn.selector = SimpleNamespace(cats_threshold=threshold)
    offset, ffn._parts = 0, {}
    for name, numel in parts:
        ffn._parts[name] = (offset, numel)
        offset += numel
    ffn._applied = None
    ffn.native = None
    return ffn, offset + 5  # some padding at the end of each bundle, as the store aligns rows


CASES = {
    "relu": ("relu", [("fc1", HIDDEN), ("fc1_bias", 1), ("fc2", HIDDEN)], None),
    "relu, no bias": ("relu", [("fc1", HIDDEN), ("fc2", HIDDEN)], None),
    "swiglu": ("swiglu", [("gate", HIDDEN), ("up", HIDDEN), ("down", HIDDEN)], None),
    "swiglu, cats": ("swiglu", [("gate", HIDDEN), ("up", HIDDEN), ("down", HIDDEN)], 0.05),
    "swiglu, biases": (
        "swiglu",
        [("gate", HIDDEN), ("gate_bias", 1), ("up", HIDDEN), ("up_bias", 1), ("down", HIDDEN)],
        None,
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_native_bundle_ffn_equals_the_torch_code(kernel, case, dtype):
    kind, parts, threshold = CASES[case]
    ffn, width = _ffn(kind, parts, threshold)
    generator = torch.Generator().manual_seed(len(case))
    n_neurons, n_bundles = 300, 57
    bundles = (torch.randn(n_bundles, width, generator=generator) / 4).to(dtype)
    neurons = torch.randperm(n_neurons, generator=generator)[:n_bundles]
    mask = torch.rand(1, n_neurons, generator=generator) < 0.6
    x = torch.randn(1, HIDDEN, generator=generator).to(dtype)
    ffn.native = False
    expected = ffn._compute(x, mask, None, bundles, neurons)
    ffn.native = True
    calls, native = [], ffn._compute_native
    ffn._compute_native = lambda *args: calls.append(1) or native(*args)
    got = ffn._compute(x, mask, None, bundles, neurons)
    assert calls and got.dtype == dtype and got.shape == (1, HIDDEN)
    tolerance = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    scale = expected.float().abs().max()
    assert (got.float() - expected.float()).abs().max() <= tolerance * scale
    # Masked neurons play no part: clearing the mask leaves nothing.
    empty = ffn._compute(x, torch.zeros_like(mask), None, bundles, neurons)
    assert torch.equal(empty, torch.zeros_like(empty))


def test_the_native_path_is_one_token_only(kernel):
    """Several tokens (a prompt) take the torch code; so does a strided view of the bundles."""
    kind, parts, threshold = CASES["relu"]
    ffn, width = _ffn(kind, parts, threshold)
    bundles = torch.randn(10, width)
    neurons = torch.arange(10)
    x = torch.randn(3, HIDDEN)
    mask = torch.ones(3, 10, dtype=torch.bool)
    ffn.native = True
    several = ffn._compute(x, mask, None, bundles, neurons)
    ffn.native = False
    torch.testing.assert_close(several, ffn._compute(x, mask, None, bundles, neurons))
    ffn.native = True
    assert not ffn._native(bundles[:, ::2], HIDDEN)


def test_parts_of_another_width_take_the_torch_code(kernel):
    ffn, _ = _ffn("relu", [("fc1", HIDDEN), ("fc2", HIDDEN)], None)
    assert ffn._native(torch.zeros(2, 2 * HIDDEN), HIDDEN)
    ffn.native = None
    assert not ffn._native(torch.zeros(2, 2 * HIDDEN), HIDDEN + 1)


def test_the_activation_is_recognised_by_what_it_computes(kernel):
    """transformers' Llama layers hold its own SiLU module, not `nn.SiLU`: the native path
    must still take them (it once did not, and the default model never ran natively)."""
    from transformers.activations import ACT2FN

    parts = [("gate", HIDDEN), ("up", HIDDEN), ("down", HIDDEN)]
    for kind, act, native in [
        ("swiglu", ACT2FN["silu"], True),
        ("relu", ACT2FN["relu"], True),
        ("swiglu", ACT2FN["gelu"], False),
        ("relu", nn.SiLU(), False),
    ]:
        ffn, _ = _ffn(kind, parts, None)
        ffn.act = act
        assert ffn._native(torch.zeros(2, 3 * HIDDEN), HIDDEN) == native, (kind, act)


def test_the_tiny_models_layers_take_the_native_path(kernel, tiny_llama_dir, tiny_opt_dir):
    from memtool.models import load_model
    from memtool.serve.flash.sparsity import ffn_parts

    for model_dir in (tiny_llama_dir, tiny_opt_dir):
        layer = load_model(model_dir).model.model
        layer = (layer.layers if hasattr(layer, "layers") else layer.decoder.layers)[0]
        kind, _, act = ffn_parts(layer)
        ffn, _ = _ffn(kind, [("a", HIDDEN), ("b", HIDDEN)], None)
        ffn.act = act
        assert ffn._native(torch.zeros(2, 2 * HIDDEN), HIDDEN), type(act)
