"""Activation recomputation and swapping: gradients equal plain autograd, bytes counted exactly.

Tiny fp32 models built from configs. Gradient tolerance for every lossless mode: rtol 1e-5,
atol 1e-6 (`EXACT`); "full" and "swap" run the same ops as plain autograd and match bit for bit;
"tokens" with alpha < 1 splits the layer's matmuls by token range and its gradients sum in another
order, a few ulps apart. bf16 and int8 compression are lossy; their stated tolerances are below.
"""

import contextlib
import dataclasses
import logging
import math
import re

import pytest
import torch
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from memtool.errors import MemtoolError
from memtool.ops.reference_train import (
    PACKABLE_DTYPES,
    pack_activation_reference,
    unpack_activation_reference,
)
from memtool.sizes import format_size
from memtool.train.activation_compress import INT8_ROW_ELEMENTS, pack_storage, unpack_storage
from memtool.train.activation_host import HostSlab
from memtool.train.activation_plan import (
    ActivationPlan,
    ActivationProfile,
    plan_activations,
    swap_warning,
    unhidden_copy_seconds,
)
from memtool.train.activation_swap import SWAP, SavedTensorStore
from memtool.train.activations import (
    ActivationConfig,
    ActivationManager,
    plan_layer_fractions,
    plan_swap_fraction,
)

EXACT = {"rtol": 1e-5, "atol": 1e-6}
VOCAB = 128
SHAPES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
}


def _llama(layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **SHAPES)).train()


def _opt() -> nn.Module:
    torch.manual_seed(1)
    config = OPTConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=128, num_hidden_layers=2,
        num_attention_heads=4, word_embed_proj_dim=32, dropout=0.1,
    )  # fmt: skip
    return OPTForCausalLM(config).train()


def _ids(seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, seq), generator=torch.Generator().manual_seed(seed))


def _step(model, ids, config: ActivationConfig | None, manager=None):
    """One forward/backward; returns (loss, grads, stats or None)."""
    model.zero_grad(set_to_none=True)
    if manager is None and config is not None:
        manager = ActivationManager(model, config)
    torch.manual_seed(123)  # the same dropout masks in every run
    context = manager.forward_context() if manager is not None else contextlib.nullcontext()
    with context:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, manager.stats() if manager is not None else None


def _relative_errors(grads, reference) -> dict[str, float]:
    """Per parameter, the Frobenius norm of the gradient error relative to the reference's."""
    return {n: ((grads[n] - reference[n]).norm() / reference[n].norm()).item() for n in reference}


def _saved_storages(model, ids) -> dict[int, tuple[int, torch.dtype]]:
    """Bytes and dtype (of the first tensor saved) of each storage a forward saves for backward,
    parameters left out: what the store counts and, with swap, moves to the host."""
    storages = {}

    def record(t):
        base = t if t._base is None else t._base
        if not (base.is_leaf and base.requires_grad):
            storage = t.untyped_storage()
            storages.setdefault(storage.data_ptr(), (storage.nbytes(), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t):
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    model.zero_grad(set_to_none=True)
    return storages


def _int8_host_bytes(nbytes: int, dtype: torch.dtype) -> int:
    """Host bytes of one swapped storage under int8: a float32 scale per 256-element row (the
    last may be shorter) then the int8 values; other dtypes as they are."""
    if dtype not in PACKABLE_DTYPES:
        return nbytes
    numel = nbytes // dtype.itemsize
    return 4 * math.ceil(numel / INT8_ROW_ELEMENTS) + numel


def _assert_grads(grads, reference, **tolerance) -> None:
    assert grads.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(grads[name], reference[name], msg=name, **tolerance)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Matrices this small gain nothing from a second thread, and on a shared machine OpenMP's
    # barrier waits (a scheduler time slice per op) would dominate the run time.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama():
    model, ids = _llama(), _ids(128)
    loss, grads, stats = _step(model, ids, ActivationConfig())
    return model, ids, loss, grads, stats


@pytest.mark.parametrize(
    ("config", "bitwise"),
    [
        (ActivationConfig(recompute="full"), True),
        (ActivationConfig(swap=True), True),
        (ActivationConfig(recompute="full", swap=True), True),
        (ActivationConfig(recompute="tokens", swap=True, swap_fraction=0.0), False),
        (ActivationConfig(recompute="tokens", swap=True, swap_fraction=0.5), False),
        (ActivationConfig(recompute="tokens", swap=True, swap_fraction=1.0), True),
        (ActivationConfig(recompute="tokens"), False),
    ],
    ids=["full", "swap", "full+swap", "tokens-a0", "tokens-a0.5", "tokens-a1", "tokens-noswap"],
)
def test_gradients_equal_plain(llama, config, bitwise):
    model, ids, plain_loss, plain_grads, _ = llama
    loss, grads, _ = _step(model, ids, config)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=0)
    _assert_grads(grads, plain_grads, **({"rtol": 0, "atol": 0} if bitwise else EXACT))


def test_swap_fraction_trades_host_bytes_for_recomputation(llama):
    model, ids, _, _, _ = llama
    stats = {}
    for alpha in (0.0, 0.5, 1.0):
        config = ActivationConfig(recompute="tokens", swap=True, swap_fraction=alpha)
        stats[alpha] = _step(model, ids, config)[2]
    host = [stats[a].host_bytes_peak for a in (0.0, 0.5, 1.0)]
    assert host[0] < host[1] < host[2]
    # Every token of both layers is recomputed at alpha=0, half at alpha=0.5, none at alpha=1.
    assert [stats[a].recomputed_tokens for a in (0.0, 0.5, 1.0)] == [2 * 128, 128, 0]
    assert all(stats[a].swap_fraction == a for a in stats)
    # alpha=0 keeps only what MEMO always swaps: per layer the input, the attention output
    # ([1, 128, 64] fp32 each) and the softmax statistics ([1, 4, 128] fp32); layer 0 also holds
    # RoPE's cos and sin ([1, 128, 16] fp32 each), shared by both layers.
    always = 2 * 128 * 64 * 4 + 4 * 128 * 4
    assert stats[0.0].layer_saved_bytes == (always + 2 * 128 * 16 * 4, always)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_tokens_on_other_llama_family_layers(family):
    config_cls, model_cls = {
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }[family]
    torch.manual_seed(0)
    model = model_cls(config_cls(num_hidden_layers=2, **SHAPES)).train()
    ids = _ids(96)
    plain_loss, plain_grads, _ = _step(model, ids, None)
    config = ActivationConfig(recompute="tokens", swap=True, swap_fraction=0.5)
    loss, grads, stats = _step(model, ids, config)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=0)
    _assert_grads(grads, plain_grads, **EXACT)
    assert stats.recomputed_tokens == 2 * 48


def test_bf16_compression_halves_host_bytes_within_tolerance(llama):
    model, ids, plain_loss, plain_grads, _ = llama
    config = ActivationConfig(swap=True, compress="bf16")
    loss, grads, stats = _step(model, ids, config)
    assert torch.equal(loss, plain_loss)  # the forward never reads the host copies
    # bf16 keeps 8 significant bits (relative rounding ≤ 2^-9 ≈ 0.2% per stored value); through
    # two layers' backward that stays within 2% of each gradient's norm, and is not zero.
    errors = _relative_errors(grads, plain_grads).values()
    assert max(errors) < 2e-2
    assert max(errors) > 0
    # Everything swapped is float32 except the int64 token ids and labels.
    assert stats.host_bytes_peak <= 0.51 * stats.swapped_bytes


def test_int8_compression_quarters_host_bytes_within_tolerance(llama):
    model, ids, plain_loss, plain_grads, _ = llama
    loss, grads, stats = _step(model, ids, ActivationConfig(swap=True, compress="int8"))
    assert torch.equal(loss, plain_loss)  # the forward never reads the host copies
    # Absmax int8 over 256-element rows rounds each stored value by at most absmax/254 of its
    # row (about 0.5% of a row's largest value, less relative to its norm). Through two layers'
    # backward that stays within 5% of each gradient's norm (1.9% at most here, in q/k_proj);
    # every parameter's gradient reads some swapped activation, so none is exact.
    errors = _relative_errors(grads, plain_grads)
    assert max(errors.values()) < 5e-2, max(errors.items(), key=lambda kv: kv[1])
    assert min(errors.values()) > 0
    # Host bytes are exactly the scales and values of each float32 storage, plus the int64 token
    # ids and labels as they are: about a quarter of the uncompressed swap (0.255 here).
    saved = _saved_storages(model, ids)
    assert any(dtype == torch.int64 for _, dtype in saved.values())
    assert stats.swapped_bytes == sum(nbytes for nbytes, _ in saved.values())
    assert stats.host_bytes_peak == sum(_int8_host_bytes(*s) for s in saved.values())
    assert stats.host_bytes_peak <= 0.3 * stats.swapped_bytes


def _int8_reference(flat: torch.Tensor) -> torch.Tensor:
    """The store's int8 round trip of a flat storage by the reference op: whole 256-element rows,
    then the remainder as one shorter row."""
    whole = flat.numel() // INT8_ROW_ELEMENTS * INT8_ROW_ELEMENTS
    rows = [flat[:whole].view(-1, INT8_ROW_ELEMENTS), flat[whole:].view(1, -1)]
    packed = [pack_activation_reference(r, "int8") for r in rows if r.numel()]
    return torch.cat([unpack_activation_reference(p).view(-1) for p in packed])


def test_int8_store_packs_storages_by_rows_and_keeps_integers():
    store = SavedTensorStore("int8")
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 300, generator=gen) * torch.tensor([[0.01], [1.0], [100.0], [5.0]])
    tensors = {
        "view": base[1, 10:50],  # a view swaps its whole storage: 1200 = 4 rows of 256 + 176
        "fp32": torch.randn(10, 100, generator=gen),  # 1000 = 3 rows of 256 + 232
        "fp16": torch.randn(2, 256, generator=gen).half(),
        "bf16": torch.randn(3, 200, generator=gen).bfloat16(),
        "int64": torch.randint(-(2**40), 2**40, (77,), generator=gen),
        "bool": torch.rand(33, generator=gen) > 0.5,
    }
    with store.saving(SWAP):
        holders = {name: store.pack(t) for name, t in tensors.items()}
    storages = [(t.untyped_storage().nbytes(), t.dtype) for t in tensors.values()]
    # Scales (4 bytes a row) and values of each float storage; the integers as they are.
    floats = (4 * 5 + 1200) + (4 * 4 + 1000) + (4 * 2 + 512) + (4 * 3 + 600)
    assert store.host_bytes == sum(_int8_host_bytes(*s) for s in storages) == floats + 616 + 33
    assert store.resident_bytes == 0  # CPU copies are synchronous: nothing left on the device
    restored = {name: store.unpack(h) for name, h in holders.items()}
    for name in ("int64", "bool"):
        assert torch.equal(restored[name], tensors[name]), name
    expected = _int8_reference(base.view(-1)).view(4, 300)[1, 10:50]
    assert torch.equal(restored["view"], expected)
    for name in ("fp32", "fp16", "bf16"):
        t = tensors[name]
        assert restored[name].dtype == t.dtype
        assert torch.equal(restored[name], _int8_reference(t.view(-1)).view(t.shape)), name
        # Lossy: within half a quantisation step of the row's absmax/127, plus the rounding
        # of the result to the storage's dtype.
        assert not torch.equal(restored[name], t)
        error = (restored[name].float() - t.float()).abs().max()
        absmax = t.float().abs().max()
        assert error <= absmax * (1 / 254 + torch.finfo(t.dtype).eps / 2), name
    del holders, restored
    assert (store.host_bytes, store.resident_bytes) == (0, 0)
    assert store.host_peak == sum(_int8_host_bytes(*s) for s in storages)


def test_int8_restore_in_flight_unpacks_the_same_values():
    # On CUDA a restore that comes before the copy to the host ends unpacks the packed device
    # parts (whole rows and the short last row, joined) instead of the host copy's single padded
    # block; both must give the reference's values.
    flat = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    parts = pack_storage(flat, "int8")
    assert [p.shape for p in parts] == [(3, INT8_ROW_ELEMENTS), (1, 232)]
    assert torch.equal(unpack_storage(parts, flat.numel()), _int8_reference(flat))


def test_int8_keeps_storages_holding_inf_on_the_device():
    store = SavedTensorStore("int8")
    # Like the logsumexp CUDA's memory-efficient attention saves: padded with inf.
    lse = torch.randn(2, 160, generator=torch.Generator().manual_seed(4))
    lse[:, 130:] = torch.inf
    masked = torch.randn(600, generator=torch.Generator().manual_seed(5)).half()
    masked[599] = -torch.inf
    finite = torch.randn(512, generator=torch.Generator().manual_seed(6))
    with store.saving(SWAP):
        holders = [store.pack(t) for t in (lse, masked, finite)]
    # Their host copies are freed and they stay resident, exact; the finite one is packed.
    assert store.host_bytes == 4 * 2 + 512
    assert store.resident_bytes == lse.nbytes + masked.nbytes
    restored = [store.unpack(h) for h in holders]
    assert torch.equal(restored[0], lse)
    assert torch.equal(restored[1], masked)
    assert torch.equal(restored[2], _int8_reference(finite))
    del holders, restored
    assert (store.host_bytes, store.resident_bytes) == (0, 0)


def test_bf16_store_compresses_float32_only():
    store = SavedTensorStore("bf16")
    x, half = torch.randn(1000), torch.randn(300).half()
    with store.saving(SWAP):
        holders = [store.pack(x), store.pack(half)]
    assert store.host_bytes == 2 * 1000 + 2 * 300  # float16 gains nothing from bf16: as is
    assert torch.equal(store.unpack(holders[0]), x.to(torch.bfloat16).float())
    assert torch.equal(store.unpack(holders[1]), half)


def test_resident_bytes_at_2048_tokens():
    model, ids = _llama(), _ids(2048)
    _, plain_grads, plain = _step(model, ids, ActivationConfig())
    for config in (
        ActivationConfig(swap=True),
        ActivationConfig(recompute="tokens", swap=True, swap_fraction=0.5),
    ):
        _, grads, stats = _step(model, ids, config)
        _assert_grads(grads, plain_grads, **EXACT)
        # The target: swapping leaves at most a quarter of plain's resident bytes.
        assert stats.peak_resident_bytes <= 0.25 * plain.peak_resident_bytes, config
        # Backward brings back one piece at a time, never the whole forward's worth.
        assert stats.backward_peak_resident_bytes < 0.5 * plain.peak_resident_bytes, config
        assert stats.swapped_bytes == stats.host_bytes_peak


def test_full_keeps_layer_inputs_only():
    model, ids = _llama(layers=3), _ids(128)
    _, _, plain = _step(model, ids, ActivationConfig())
    _, _, full = _step(model, ids, ActivationConfig(recompute="full"))
    hidden = 128 * 64 * 4
    # Layer 0 also holds what all layers share: RoPE's cos and sin, and the int64 position ids.
    shared = 2 * 128 * 16 * 4 + 128 * 8
    assert full.layer_saved_bytes == (hidden + shared, hidden, hidden)
    # Outside the layers (embedding, final norm, head, loss) nothing changes.
    outside = plain.peak_resident_bytes - sum(plain.layer_saved_bytes)
    assert full.peak_resident_bytes == sum(full.layer_saved_bytes) + outside
    assert full.recomputed_tokens == 3 * 128


def test_plain_counts_each_storage_once_and_no_parameters(llama):
    model, ids, _, _, plain = llama
    naive = 0

    def record(t):
        nonlocal naive
        naive += t.nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t):
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    storages = _saved_storages(model, ids)
    assert plain.peak_resident_bytes == sum(nbytes for nbytes, _ in storages.values())
    assert plain.peak_resident_bytes < naive  # views deduplicated, weights left out
    manager = ActivationManager(model, ActivationConfig())
    _step(model, ids, None, manager)
    manager.reset_peak()  # backward released every holder: nothing is left to count
    assert manager.stats().peak_resident_bytes == 0


def test_opt_full_and_swap_replay_dropout():
    model, ids = _opt(), _ids(64)
    plain_loss, plain_grads, _ = _step(model, ids, None)
    for config in (ActivationConfig(recompute="full"), ActivationConfig(swap=True)):
        loss, grads, _ = _step(model, ids, config)
        assert torch.equal(loss, plain_loss)
        _assert_grads(grads, plain_grads, rtol=0, atol=0)


def test_tokens_on_unknown_architecture_is_refused():
    with pytest.raises(MemtoolError, match=r"not opt \(OPTDecoderLayer\).*--recompute full"):
        ActivationManager(_opt(), ActivationConfig(recompute="tokens", swap=True))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(x)))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.blocks = nn.ModuleList(_Block() for _ in range(3))

    def forward(self, input_ids, labels=None, use_cache=None):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return type("Out", (), {"loss": x.pow(2).mean()})


def test_full_and_swap_on_any_list_of_layers():
    torch.manual_seed(0)
    model, ids = _Net(), _ids(32)
    _, plain_grads, _ = _step(model, ids, None)
    for config in (ActivationConfig(recompute="full", swap=True), ActivationConfig(swap=True)):
        _, grads, stats = _step(model, ids, config)
        _assert_grads(grads, plain_grads, rtol=0, atol=0)
        assert len(stats.layer_saved_bytes) == 3
    with pytest.raises(MemtoolError, match=r"_Net.*--recompute full"):
        ActivationManager(model, ActivationConfig(recompute="tokens", swap=True))


def test_frozen_embeddings_still_give_layer_gradients():
    # The layer input does not require grad; the recomputed layer's weights still get gradients.
    torch.manual_seed(0)
    model, ids = _Net(), _ids(32)
    model.embed.weight.requires_grad_(False)
    _, plain_grads, _ = _step(model, ids, None)
    _, grads, _ = _step(model, ids, ActivationConfig(recompute="full"))
    _assert_grads(grads, plain_grads, rtol=0, atol=0)


def test_hooks_removed_after_the_context(llama):
    model, ids, _, plain_grads, _ = llama
    manager = ActivationManager(model, ActivationConfig(recompute="tokens", swap=True))
    _step(model, ids, None, manager)
    layers = model.model.layers
    assert all("forward" not in layer.__dict__ for layer in layers)
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in layers)
    manager.reset_peak()
    _, grads, _ = _step(model, ids, None)  # outside the context: plain autograd
    _assert_grads(grads, plain_grads, rtol=0, atol=0)
    stats = manager.stats()
    assert (stats.peak_resident_bytes, stats.swapped_bytes, stats.recomputed_tokens) == (0, 0, 0)


def test_budget_below_one_layer_names_the_minimum(llama):
    model, ids, _, _, plain = llama
    outside = plain.peak_resident_bytes - sum(plain.layer_saved_bytes)
    minimum = max(*plain.layer_saved_bytes, outside)
    config = ActivationConfig(recompute="full", swap=True, activation_budget_bytes=minimum - 1)
    with pytest.raises(MemtoolError, match=f"below the minimum {format_size(minimum)}"):
        _step(model, ids, config)


def test_budget_picks_the_cheapest_mode_that_fits(llama):
    model, ids, _, plain_grads, plain = llama
    budgets = {"plain": plain.peak_resident_bytes, "full": plain.peak_resident_bytes // 2}
    for expected, budget in budgets.items():
        config = ActivationConfig(recompute="full", swap=True, activation_budget_bytes=budget)
        manager = ActivationManager(model, config)
        _, _, probe = _step(model, ids, None, manager)
        assert probe.mode == "swap"  # the measured micro-batch swaps everything
        _, grads, stats = _step(model, ids, None, manager)
        assert stats.mode == expected
        assert stats.peak_resident_bytes <= budget
        _assert_grads(grads, plain_grads, rtol=0, atol=0)


def test_budget_without_swapping_is_kept_while_it_is_measured(llama, caplog):
    """No swapping allowed: the measured micro-batch recomputes whole layers (keeping only their
    inputs) instead of running plain autograd over the budget, and still measures every layer."""
    model, ids, _, plain_grads, plain = llama
    outside = plain.peak_resident_bytes - sum(plain.layer_saved_bytes)
    minimum = max(*plain.layer_saved_bytes, outside)
    extra = 8 * ids.numel()  # see below
    budgets = {"plain": plain.peak_resident_bytes + extra, "full": plain.peak_resident_bytes // 2}
    for expected, budget in budgets.items():
        manager = ActivationManager(model, ActivationConfig(activation_budget_bytes=budget))
        _, grads, probe = _step(model, ids, None, manager)
        assert probe.mode == "full" and probe.peak_resident_bytes <= budgets["full"]
        _assert_grads(grads, plain_grads, rtol=0, atol=0)
        with caplog.at_level(logging.INFO, logger="memtool.train.activations"):
            _, grads, stats = _step(model, ids, None, manager)  # planned as this one starts
        # The plan saw plain autograd's bytes, counted as backward recomputed each layer, plus
        # what a layer's region holds that plain autograd never saves: its int64 position ids
        # (8 bytes a token, once).
        seen = re.search(r"plain (\d+) bytes, one layer (\d+)", caplog.text)
        assert int(seen[1]) - plain.peak_resident_bytes in (0, extra), caplog.text
        assert int(seen[2]) - minimum in (0, extra), caplog.text
        assert stats.mode == expected and stats.peak_resident_bytes <= budget
        _assert_grads(grads, plain_grads, rtol=0, atol=0)
        caplog.clear()
    manager = ActivationManager(model, ActivationConfig(activation_budget_bytes=minimum - 1))
    _step(model, ids, None, manager)
    with pytest.raises(MemtoolError, match="below the minimum"):
        _step(model, ids, None, manager)


def test_planned_swap_fraction_and_slab_reuse(llama):
    model, ids, _, plain_grads, _ = llama
    # A host budget that holds the always-swapped part and a little more forces 0 < alpha < 1.
    config = ActivationConfig(recompute="tokens", swap=True, host_budget_bytes=600_000)
    manager = ActivationManager(model, config)
    _, _, probe = _step(model, ids, None, manager)
    assert probe.swap_fraction == 1.0
    manager.reset_peak()
    _, grads, stats = _step(model, ids, None, manager)
    assert 0.0 < stats.swap_fraction < 1.0
    assert stats.host_bytes_peak <= 600_000
    _assert_grads(grads, plain_grads, **EXACT)
    # Alpha is planned per layer; each layer's forward swapped its own share of the tokens.
    fractions = stats.layer_swap_fractions
    assert len(fractions) == len(manager.layers)
    assert stats.swap_fraction == pytest.approx(sum(fractions) / len(fractions))
    seq = ids.shape[1]
    expected = sum(seq - math.floor(a * seq) for a in fractions) * ids.shape[0]
    assert stats.recomputed_tokens == expected


def test_probe_repeats_once_when_its_copies_spilled(llama):
    """Where spilled copies are synchronous (CUDA: pageable memory), the first measured
    micro-batch, which fills an empty slab, is measured again once the slab has grown."""
    model, ids, _, plain_grads, _ = llama
    config = ActivationConfig(recompute="tokens", swap=True, host_budget_bytes=600_000)
    manager = ActivationManager(model, config)
    assert not manager._cuda  # CPU: copies are synchronous anyway and timed apart
    manager._cuda = True
    slab = manager._store.slab
    for _ in range(2):
        _, _, probe = _step(model, ids, None, manager)
        assert (probe.mode, probe.swap_fraction) == ("tokens+swap", 1.0)
    assert slab.buffer.numel() >= slab.high_water > 0  # the second probe fitted the slab
    _, grads, stats = _step(model, ids, None, manager)
    assert 0.0 < stats.swap_fraction < 1.0
    _assert_grads(grads, plain_grads, **EXACT)
    # Without a spill one probe suffices (the slab is big enough from now on).
    manager = ActivationManager(model, config)
    manager._cuda = True
    manager._store.slab = slab
    _step(model, ids, None, manager)
    _, _, stats = _step(model, ids, None, manager)
    assert 0.0 < stats.swap_fraction < 1.0


def test_config_validation():
    bad = [
        ActivationConfig(recompute="some"),
        ActivationConfig(recompute="tokens", swap=True, swap_fraction=1.5),
        ActivationConfig(recompute="full", swap=True, swap_fraction=0.5),
        ActivationConfig(compress="bf16"),
        ActivationConfig(compress="int8"),
        ActivationConfig(activation_budget_bytes=0),
    ]
    for config in bad:
        with pytest.raises(MemtoolError):
            config.validate()
    for compress in ("bf16", "int8"):
        ActivationConfig(swap=True, compress=compress).validate()
    with pytest.raises(
        MemtoolError, match="unknown activation compression 'int4': use bf16 or int8"
    ):
        ActivationConfig(swap=True, compress="int4").validate()
    with pytest.raises(MemtoolError, match="unknown activation compression 'fp8'"):
        SavedTensorStore("fp8")


def test_transformers_checkpointing_is_refused():
    model = _llama()
    model.activation_checkpointing_enable()
    with pytest.raises(MemtoolError, match="activation_checkpointing_disable"):
        ActivationManager(model, ActivationConfig(recompute="full"))


def test_plan_swap_fraction():
    # Copies of A + alpha·W bytes per layer must hide behind one layer's compute and fit the host.
    common = {"swappable_bytes_per_layer": 20e6, "always_swapped_bytes_per_layer": 4e6}
    bandwidth_bound = plan_swap_fraction(1e-3, 10e9, n_layers=32, host_budget_bytes=None, **common)
    assert bandwidth_bound == pytest.approx((1e-3 * 10e9 - 4e6) / 20e6)  # 0.3
    assert plan_swap_fraction(1e-2, 10e9, n_layers=32, host_budget_bytes=None, **common) == 1.0
    host_bound = plan_swap_fraction(1e-3, 10e9, n_layers=32, host_budget_bytes=192e6, **common)
    assert host_bound == pytest.approx(0.1)  # 32 · (4e6 + 0.1 · 20e6) = 192e6
    # Too slow a link to hide even the always-swapped part: recompute everything else.
    assert plan_swap_fraction(1e-4, 10e9, n_layers=32, host_budget_bytes=None, **common) == 0.0
    faster = [
        plan_swap_fraction(1e-3, bw, n_layers=32, host_budget_bytes=None, **common)
        for bw in (5e9, 10e9, 20e9)
    ]
    assert faster == sorted(faster)
    with pytest.raises(MemtoolError, match="cannot hold"):
        plan_swap_fraction(1e-3, 10e9, n_layers=32, host_budget_bytes=32 * 4e6 - 1, **common)
    assert plan_swap_fraction(1e-3, 1e9, 0, 4e6, 32, None) == 1.0  # nothing to trade
    with pytest.raises(MemtoolError):
        plan_swap_fraction(0.0, 10e9, n_layers=32, host_budget_bytes=None, **common)


def test_plan_layer_fractions():
    # Layer i's copies hide behind layer i+1's compute: a slower next layer buys a larger alpha.
    swappable, always = (20e6,) * 3, (4e6,) * 3
    fractions = plan_layer_fractions((1e-3, 1.5e-3, 0.8e-3), 10e9, swappable, always, None)
    assert fractions[0] == pytest.approx((1.5e-3 * 10e9 - 4e6) / 20e6)  # behind layer 1
    assert fractions[1] == pytest.approx((0.8e-3 * 10e9 - 4e6) / 20e6)  # behind layer 2
    assert fractions[2] == pytest.approx((0.8e-3 * 10e9 - 4e6) / 20e6)  # last: its own time
    # Equal layers: the uniform plan.
    equal = plan_layer_fractions((1e-3,) * 32, 10e9, (20e6,) * 32, (4e6,) * 32, 192e6)
    uniform = plan_swap_fraction(1e-3, 10e9, 20e6, 4e6, 32, 192e6)
    assert equal == pytest.approx((uniform,) * 32, abs=1e-9)
    # A tight host budget caps the largest alphas first and is then full.
    budget = 3 * 4e6 + 20e6 * 0.7  # alphas (0.55, 0.2, 0.2) would need 0.95 of W
    capped = plan_layer_fractions((1e-3, 1.5e-3, 0.8e-3), 10e9, swappable, always, budget)
    assert sum(4e6 + a * 20e6 for a in capped) == pytest.approx(budget, rel=1e-6)
    assert capped == pytest.approx((0.3, 0.2, 0.2), abs=1e-6)  # only the largest comes down
    with pytest.raises(MemtoolError, match="cannot hold"):
        plan_layer_fractions((1e-3,) * 3, 10e9, swappable, always, 3 * 4e6 - 1)


def test_plan_activations():
    profile = ActivationProfile(
        layer_saved_bytes=(100,) * 4, layer_input_bytes=(10,) * 4, layer_always_bytes=(25,) * 4,
        outside_bytes=50, layer_time_s=1.0, host_bandwidth_bytes_per_s=1e9,
    )  # fmt: skip
    assert (profile.plain_bytes, profile.minimum_bytes) == (450, 100)

    def plan(recompute, swap, budget):
        return plan_activations(profile, recompute, swap, None, budget, None).mode

    assert plan("full", True, 450) == "plain"
    assert plan("full", True, 100) == "full"  # 4 inputs + outside = 90 fit
    # "none" under a budget: recomputing whole layers before swapping, with or without swap
    assert plan("none", True, 100) == "full" and plan("none", False, 200) == "full"
    assert plan("tokens", False, 150) == "tokens"  # always-kept 100 + outside 50
    assert plan("tokens", True, 100) == "tokens+swap"
    assert plan("tokens", True, None) == "tokens+swap"
    with pytest.raises(MemtoolError, match="below the minimum 100 B"):
        plan("full", True, 99)
    with pytest.raises(MemtoolError, match="enable swapping"):
        plan("tokens", False, 120)
    wide = dataclasses.replace(profile, layer_input_bytes=(20,) * 4)  # full keeps 130
    assert plan_activations(wide, "none", True, None, 100, None).mode == "swap"
    with pytest.raises(MemtoolError, match="enable swapping"):
        plan_activations(wide, "none", False, None, 100, None)


def test_swapping_that_cannot_hide_is_counted_and_warned_about():
    # An H200-like case: layers compute in 0.4 ms, each swaps 270 MB at 50 GB/s (5.4 ms).
    mb = 1_000_000
    slow = ActivationProfile(
        layer_saved_bytes=(270 * mb,) * 6, layer_input_bytes=(8 * mb,) * 6,
        layer_always_bytes=(60 * mb,) * 6, outside_bytes=100 * mb, layer_time_s=4e-4,
        host_bandwidth_bytes_per_s=50e9,
    )  # fmt: skip
    every = ActivationPlan("none", True)
    assert unhidden_copy_seconds(slow, every) == pytest.approx(6 * (5.4e-3 - 4e-4))
    memo = ActivationPlan("tokens", True, 0.0)  # only the always-swapped 60 MB: 1.2 ms each
    assert unhidden_copy_seconds(slow, memo) == pytest.approx(6 * (1.2e-3 - 4e-4))
    assert unhidden_copy_seconds(slow, ActivationPlan("full", False)) == 0.0
    message = swap_warning(slow, memo)
    assert message is not None and "cannot hide behind compute" in message
    assert "--recompute full without swapping keeps 148 MB and copies nothing" in message
    # Slow layers hide the same copies: no warning.
    fast = dataclasses.replace(slow, layer_time_s=0.01)
    assert unhidden_copy_seconds(fast, every) == 0.0 and swap_warning(fast, every) is None
    assert swap_warning(dataclasses.replace(slow, host_bandwidth_bytes_per_s=None), every) is None


def test_host_slab_spills_then_grows_between_steps():
    slab = HostSlab()
    first, in_slab = slab.alloc(1000, pinned=False)
    assert (first.numel(), in_slab) == (1000, False)  # empty slab: ordinary memory
    slab.grow_if_idle()
    assert slab.buffer.numel() == 0  # never while something is allocated
    slab.free(1000, in_slab)
    slab.grow_if_idle()
    assert slab.buffer.numel() >= 1000
    a, a_in = slab.alloc(600, pinned=False)
    _, b_in = slab.alloc(300, pinned=False)
    assert a_in and not b_in  # 600 rounds up to 1024 of the 1024-byte slab
    slab.free(600, a_in)
    slab.free(300, b_in)
    again, again_in = slab.alloc(600, pinned=False)  # rewound once empty
    assert again_in and again.data_ptr() == a.data_ptr()
