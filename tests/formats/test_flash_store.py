"""The flash store: bundles round-trip bit-exactly, stay aligned, and damage is caught."""

import pytest
import torch
from torch import nn

from memtool.errors import MemtoolError
from memtool.formats import flash_store
from memtool.formats.flash_store import (
    BUNDLE_ALIGN_BYTES,
    FFN_FILE,
    LAYER_ALIGN_BYTES,
    RESIDENT_FILE,
    model_fingerprint,
    open_flash_store,
    write_flash_store,
)
from memtool.models.layers import decoder_layers

HIDDEN, NEURONS = 64, 128


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    # default inits leave biases zero and norms one: random values make bit-equality meaningful
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    return model.eval()


def llama(dtype=torch.float32, seed=0, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=NEURONS,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        tie_word_embeddings=tie,
    )
    return _randomize(LlamaForCausalLM(config), seed).to(dtype)


def opt(dtype=torch.float32, seed=0):
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        hidden_size=HIDDEN,
        ffn_dim=NEURONS,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=128,
        word_embed_proj_dim=HIDDEN,
        max_position_embeddings=64,
        activation_function="relu",
    )
    return _randomize(OPTForCausalLM(config), seed).to(dtype)


def _bits(tensor):
    return tensor.contiguous().view(torch.int16 if tensor.element_size() == 2 else torch.int32)


def _assert_bit_equal(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(_bits(actual), _bits(expected))


def _expected_parts(model, layer, ids, dtype, gate_resident):
    block = decoder_layers(model)[layer]
    idx = torch.as_tensor(ids, dtype=torch.long)
    if hasattr(block, "mlp"):
        mlp = block.mlp
        out = {"up": mlp.up_proj.weight[idx], "down": mlp.down_proj.weight[:, idx]}
        if not gate_resident:
            out["gate"] = mlp.gate_proj.weight[idx]
    else:
        out = {"fc2": block.fc2.weight[:, idx]}
        if not gate_resident:
            out.update(fc1=block.fc1.weight[idx], fc1_bias=block.fc1.bias[idx])
    return {k: v.detach().to(dtype) for k, v in out.items()}


ID_SETS = {
    "sorted": [0, 5, 17, 100, 127],
    "unsorted": [99, 3, 64, 2, 120],
    "duplicates": [7, 7, 3, 7, 3],
    "runs": [10, 11, 12, 13, 40, 41, 127, 126],
    "all": list(range(NEURONS)),
    "empty": [],
    "random": torch.randint(0, NEURONS, (40,), generator=torch.Generator().manual_seed(1)).tolist(),
}

CASES = [
    ("llama", torch.float16, False, torch.float16),
    ("llama", torch.bfloat16, False, torch.bfloat16),
    ("llama", torch.float32, False, torch.float16),
    ("llama", torch.bfloat16, True, torch.bfloat16),
    ("opt", torch.float16, False, torch.float16),
    ("opt", torch.float32, False, torch.float16),
    ("opt", torch.float16, True, torch.float16),
]


@pytest.mark.parametrize(("arch", "model_dtype", "gate_resident", "store_dtype"), CASES)
def test_round_trip_is_bit_exact(tmp_path, arch, model_dtype, gate_resident, store_dtype):
    model = (llama if arch == "llama" else opt)(model_dtype)
    kwargs = {"gate_resident": True} if gate_resident else {}
    info = write_flash_store(model, tmp_path / "store", **kwargs)
    assert info.dtype == store_dtype and info.kind == ("swiglu" if arch == "llama" else "relu")
    with open_flash_store(tmp_path / "store", model_fingerprint(model)) as store:
        for layer in range(2):
            for ids in ID_SETS.values():
                parts = store.read_neurons(layer, ids)
                expected = _expected_parts(model, layer, ids, store_dtype, gate_resident)
                assert parts.keys() == expected.keys()
                for name in expected:
                    _assert_bit_equal(parts[name], expected[name])
        resident = store.resident_state_dict()
    bundled = {f"{n}.weight" for n, _ in model.named_modules() if n.endswith("up_proj")}
    bundled |= {f"{n}.weight" for n, _ in model.named_modules() if n.endswith(("down_proj", "fc2"))}
    if not gate_resident:
        first = ("gate_proj", "fc1")
        bundled |= {f"{n}.weight" for n, _ in model.named_modules() if n.endswith(first)}
        bundled |= {f"{n}.bias" for n, _ in model.named_modules() if n.endswith("fc1")}
    state = model.state_dict()
    assert resident.keys() == state.keys() - bundled
    for name, tensor in resident.items():
        _assert_bit_equal(tensor, state[name].to(store_dtype))


def test_layers_and_bundles_are_aligned(tmp_path):
    store = open_flash_store(write_flash_store(opt(), tmp_path / "s").folder)
    for layer in store.layers:
        assert layer["offset"] % LAYER_ALIGN_BYTES == 0
        assert layer["stride_bytes"] % BUNDLE_ALIGN_BYTES == 0
        assert layer["bundle_bytes"] == (2 * HIDDEN + 1) * 2 <= layer["stride_bytes"]
        names = [(p["name"], p["numel"], p["offset_bytes"]) for p in layer["layout"]]
        assert names == [
            ("fc1", HIDDEN, 0),
            ("fc2", HIDDEN, 2 * HIDDEN),
            ("fc1_bias", 1, 4 * HIDDEN),
        ]
    assert store.layers[1]["offset"] > 0
    store.close()


def test_explicit_dtype_and_tied_embeddings(tmp_path):
    model = llama(torch.float32, tie=True)
    write_flash_store(model, tmp_path / "s", dtype=torch.bfloat16)
    with open_flash_store(tmp_path / "s") as store:
        assert store.dtype == torch.bfloat16
        assert store.meta["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
        resident = store.resident_state_dict()
    expected = model.lm_head.weight.detach().to(torch.bfloat16)
    _assert_bit_equal(resident["lm_head.weight"], expected)


def test_truncated_ffn_is_detected(tmp_path):
    folder = write_flash_store(llama(torch.float16), tmp_path / "s").folder
    size = (folder / FFN_FILE).stat().st_size
    with open(folder / FFN_FILE, "r+b") as handle:
        handle.truncate(size - 100)
    with pytest.raises(MemtoolError, match=rf"ffn\.bin is {size - 100} bytes, expected {size}"):
        open_flash_store(folder, verify=False)


@pytest.mark.parametrize("name", [FFN_FILE, RESIDENT_FILE])
def test_flipped_byte_is_caught_by_crc(tmp_path, name):
    folder = write_flash_store(llama(torch.float16), tmp_path / "s").folder
    path = folder / name
    data = bytearray(path.read_bytes())
    data[len(data) - 50] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(MemtoolError, match="CRC32"):
        open_flash_store(folder)
    open_flash_store(folder, verify=False).close()


def test_fingerprint_ties_store_to_its_model(tmp_path):
    model = llama(torch.float16)
    info = write_flash_store(model, tmp_path / "s")
    assert info.fingerprint == model_fingerprint(llama(torch.float16))
    open_flash_store(info.folder, model_fingerprint(model)).close()
    other = model_fingerprint(llama(torch.float16, seed=1))
    with pytest.raises(MemtoolError, match="store was built from a different model"):
        open_flash_store(info.folder, other)


def test_unsupported_mlp_names_the_layer(tmp_path):
    model = llama()
    decoder_layers(model)[1].mlp = nn.Sequential(
        nn.Linear(HIDDEN, NEURONS), nn.GELU(), nn.Linear(NEURONS, HIDDEN)
    )
    with pytest.raises(MemtoolError, match=r"decoder layer 1 .*supported are SwiGLU"):
        write_flash_store(model, tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_failure_mid_write_leaves_no_folder(tmp_path, monkeypatch):
    real, calls = flash_store._bundles, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*args)

    monkeypatch.setattr(flash_store, "_bundles", failing)
    with pytest.raises(OSError, match="disk full"):
        write_flash_store(llama(), tmp_path / "s")
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_is_refused(tmp_path):
    (tmp_path / "s").mkdir()
    with pytest.raises(MemtoolError, match="already exists"):
        write_flash_store(llama(), tmp_path / "s")


def test_out_of_range_reads_are_refused(tmp_path):
    with open_flash_store(write_flash_store(opt(), tmp_path / "s").folder) as store:
        with pytest.raises(MemtoolError, match=r"neuron ids must lie in \[0, 128\)"):
            store.read_neurons(0, [3, NEURONS])
        with pytest.raises(MemtoolError, match="layer 2 out of range"):
            store.read_neurons(2, [0])
