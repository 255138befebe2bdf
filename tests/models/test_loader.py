import shutil
import time

import pytest
import torch

from memtool.errors import MemtoolError
from memtool.models import load_model


def test_loads_local_llama_folder(tiny_llama_dir):
    loaded = load_model(tiny_llama_dir)
    assert loaded.kind == "hf-folder"
    assert loaded.model.config.model_type == "llama"
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert loaded.bytes_on_disk == (tiny_llama_dir / "model.safetensors").stat().st_size
    assert loaded.max_context == 128
    assert not loaded.model.training


def test_loads_opt_relu_folder_in_bf16(tiny_opt_dir):
    loaded = load_model(tiny_opt_dir, dtype="bfloat16")
    assert loaded.model.config.model_type == "opt"
    assert next(loaded.model.parameters()).dtype == torch.bfloat16


def test_nonexistent_path_names_it(tmp_path):
    with pytest.raises(MemtoolError, match="not found"):
        load_model(tmp_path / "nope")


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(MemtoolError, match=r"config\.json is missing"):
        load_model(tmp_path)


def test_truncated_safetensors_is_detected(tiny_llama_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(MemtoolError, match=r"corrupt safetensors.*truncated"):
        load_model(broken)


def test_garbage_safetensors_is_detected(tiny_llama_dir, tmp_path):
    broken = tmp_path / "garbage"
    shutil.copytree(tiny_llama_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(MemtoolError, match="corrupt safetensors"):
        load_model(broken)


def test_pickle_checkpoint_refused_unless_allowed(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "pickled"
    folder.mkdir()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama_dir / name, folder / name)
    assert not list(folder.glob("*.safetensors"))
    with pytest.raises(MemtoolError, match="--allow-pickle"):
        load_model(folder)
    loaded = load_model(folder, allow_pickle=True)
    reference = load_model(tiny_llama_dir)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, reference.model(ids).logits)


def test_unknown_dtype(tiny_llama_dir):
    with pytest.raises(MemtoolError, match="unknown dtype"):
        load_model(tiny_llama_dir, dtype="float8")


def test_hub_id_offline_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # closed port: unreachable
    began = time.perf_counter()
    with pytest.raises(MemtoolError, match="hub is unreachable"):
        load_model("some-org/some-model")
    assert time.perf_counter() - began < 15


def test_unknown_name_is_not_a_hub_id(tmp_path):
    with pytest.raises(MemtoolError, match="built-in name"):
        load_model("definitely-not-a-model")


def test_a_folder_without_a_tokenizer_says_so(tmp_path):
    from memtool.models.loader import load_tokenizer

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(MemtoolError, match=r"has no tokenizer .*copy in the tokenizer"):
        load_tokenizer(tmp_path)
