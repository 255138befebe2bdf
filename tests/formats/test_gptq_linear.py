"""GPTQLinear on act-order checkpoints with shuffled g_idx: rows held sorted by group, so the
native CPU kernel runs them, with the same outputs and the checkpoint's own state dict."""

import pytest
import torch

from memtool import ops
from memtool.formats.gptq_linear import GPTQLinear
from memtool.formats.gptq_pack import pack_gptq
from memtool.ops import reference


def _tensors(g_idx: torch.Tensor, bits: int = 4, out_features: int = 64) -> dict:
    gen = torch.Generator().manual_seed(0)
    in_features = g_idx.numel()
    n_groups = int(g_idx.max()) + 1
    codes = torch.randint(0, 2**bits, (in_features, out_features), generator=gen)
    zeros = torch.randint(1, 2**bits, (n_groups, out_features), generator=gen)
    scales = torch.rand(n_groups, out_features, generator=gen) / 10 + 0.01
    return pack_gptq(codes.int(), zeros.int(), scales, g_idx.int(), bits)


def _shuffled(in_features: int, group_size: int) -> torch.Tensor:
    order = torch.randperm(in_features, generator=torch.Generator().manual_seed(1))
    g_idx = torch.empty(in_features, dtype=torch.int64)
    g_idx[order] = torch.arange(in_features) // group_size  # act order's i-th is in group i // gs
    return g_idx


@pytest.mark.parametrize(("bits", "in_features"), [(4, 192), (3, 160), (2, 128)])
def test_shuffled_groups_are_sorted_and_give_the_same_outputs(bits, in_features):
    tensors = _tensors(_shuffled(in_features, 64), bits)  # 160: a ragged last group of 32
    module = GPTQLinear.from_tensors(tensors, bits)
    assert module.in_order is not None
    assert torch.equal(module.g_idx.long(), torch.arange(in_features) // 64)
    x = torch.randn(3, in_features, generator=torch.Generator().manual_seed(2))
    want = reference.gptq_linear(
        x,
        tensors["qweight"],
        tensors["qzeros"],
        tensors["scales"],
        tensors["g_idx"],
        bits,
        in_features,
    )
    if ops.cpu_kernel_status()[0]:  # the sorted layer is one the native kernel runs
        assert ops.gptq_backend_used(x, module.g_idx, bits, in_features) is ops.KernelBackend.CPU
    torch.testing.assert_close(module(x), want, rtol=1e-4, atol=1e-4)
    # The state dict is the checkpoint's layout, and loading it back sorts again.
    state = module.state_dict()
    assert "in_order" not in state
    for name in ("qweight", "g_idx"):
        assert torch.equal(state[name], tensors[name]), name
    fresh = GPTQLinear(in_features, 64, bits, tensors["scales"].shape[0], False)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.in_order, module.in_order)
    torch.testing.assert_close(fresh(x), want, rtol=1e-4, atol=1e-4)
    # A state dict without the layer's rows (a model loading its other tensors) leaves it be;
    # one with its rows again (sorted ones held now) gives the same layer.
    module.load_state_dict({}, strict=False)
    module.load_state_dict(state)
    assert torch.equal(module.in_order, fresh.in_order)
    torch.testing.assert_close(module(x), want, rtol=1e-4, atol=1e-4)


def test_a_loaded_dynamic_groups_checkpoint_runs_sorted(tiny_llama_dir, text_file, tmp_path):
    """Through `load_model`: every act-order linear with dynamic groups is held sorted, and the
    model computes what the checkpoint's own layout computes (the reference on each layer)."""
    from memtool import load_model
    from memtool.compress import CalibrationConfig, GPTQConfig, compress

    calib = CalibrationConfig(data=str(text_file), n_samples=8, seq_len=32, batch_size=4)
    config = GPTQConfig(bits=4, group_size=32, static_groups=False)
    _, _, fake = compress(
        str(tiny_llama_dir), config, calib, output=tmp_path / "q", show_progress=False
    )
    model = load_model(tmp_path / "q").model
    layers = [m for m in model.modules() if isinstance(m, GPTQLinear)]
    assert layers and all(m.in_order is not None for m in layers)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, fake.model(ids).logits, rtol=1e-3, atol=1e-3)


def test_static_and_uneven_groups_are_left_as_they_are():
    static = torch.arange(128) // 64
    module = GPTQLinear.from_tensors(_tensors(static), 4)
    assert module.in_order is None
    sizes = torch.tensor([32, 64, 32])  # sorted, still not i // group_size for any size
    uneven = torch.repeat_interleave(torch.arange(3), sizes)[torch.randperm(128)]
    module = GPTQLinear.from_tensors(_tensors(uneven), 4)
    assert module.in_order is None and torch.equal(module.g_idx.long(), uneven)
