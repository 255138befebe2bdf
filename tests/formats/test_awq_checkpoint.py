"""AWQ results on disk: the AWQ GEMM folder round-trips exactly through `load_model`; widths and
shapes GEMM cannot hold go to the GPTQ layout; interrupted writes leave nothing behind."""

import json

import pytest
import torch

from memtool import load_model
from memtool.compress import AWQConfig, CalibrationConfig, compress
from memtool.errors import MemtoolError
from memtool.formats.awq_linear import AWQLinear
from memtool.formats.awq_pack import dequantize_awq
from memtool.formats.gptq_linear import GPTQLinear
from memtool.ops.reference import dequantize_gptq


def _calib(text_file):
    return CalibrationConfig(data=str(text_file), n_samples=8, seq_len=32, batch_size=4)


@pytest.mark.parametrize("sym", [False, True], ids=["zero-point", "symmetric"])
def test_gemm_checkpoint_round_trips_exactly(sym, tiny_llama_dir, text_file, tmp_path):
    out = tmp_path / "awq"
    config = AWQConfig(bits=4, group_size=32, sym=sym)
    result, weights, in_memory = compress(
        str(tiny_llama_dir), config, _calib(text_file), output=out, show_progress=False
    )
    assert result.warnings == []
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    keys = ("quant_method", "bits", "group_size", "zero_point", "version")
    assert [quant[k] for k in keys] == ["awq", 4, 32, not sym, "gemm"]
    assert quant["meta"]["method"] == "awq" and quant["meta"]["calibration"]["n_windows"] == 8

    loaded = load_model(out)
    modules = {n: m for n, m in loaded.model.named_modules() if isinstance(m, AWQLinear)}
    assert set(modules) == set(weights)
    for name, module in modules.items():
        dense = dequantize_awq(module.qweight, module.qzeros, module.scales)
        assert torch.equal(dense.T, weights[name].dequantize()), name
    # Everything else (scaled norms included) is stored in float16, hence the tolerance.
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(ids).logits, in_memory.model(ids).logits, rtol=0, atol=2e-2
        )


def test_three_bits_go_to_the_gptq_layout(tiny_llama_dir, text_file, tmp_path):
    out = tmp_path / "awq3"
    config = AWQConfig(bits=3, group_size=32)
    result, weights, _ = compress(
        str(tiny_llama_dir), config, _calib(text_file), output=out, show_progress=False
    )
    assert any("4-bit codes only" in warning for warning in result.warnings)
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "gptq" and quant["bits"] == 3 and quant["sym"] is False
    assert quant["meta"]["method"] == "awq"
    loaded = load_model(out)
    modules = {n: m for n, m in loaded.model.named_modules() if isinstance(m, GPTQLinear)}
    assert set(modules) == set(weights)
    for name, m in modules.items():
        dense = dequantize_gptq(m.qweight, m.qzeros, m.scales, m.g_idx, 3, m.in_features)
        assert torch.equal(dense.T, weights[name].dequantize()), name


def test_ragged_groups_need_the_gptq_layout(tiny_llama_dir, text_file, tmp_path):
    # 64 inputs in groups of 48: a ragged last group, which GEMM (no g_idx) cannot store.
    out = tmp_path / "forced"
    with pytest.raises(MemtoolError, match="ragged"):
        compress(
            str(tiny_llama_dir),
            AWQConfig(group_size=48, checkpoint_format="gemm"),
            _calib(text_file),
            output=out,
            show_progress=False,
        )
    assert not out.exists()
    out = tmp_path / "auto"
    result, _, _ = compress(
        str(tiny_llama_dir),
        AWQConfig(group_size=48),
        _calib(text_file),
        output=out,
        show_progress=False,
    )
    assert any("GPTQ layout" in warning for warning in result.warnings)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 4
    assert isinstance(load_model(out).model.model.layers[0].mlp.down_proj, GPTQLinear)


def test_interrupted_save_leaves_no_output(tiny_opt_dir, text_file, tmp_path, monkeypatch):
    import memtool.formats.checkpoint_io as checkpoint

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_file", boom)
    out = tmp_path / "never"
    with pytest.raises(KeyboardInterrupt):
        compress(
            str(tiny_opt_dir),
            AWQConfig(group_size=32),
            _calib(text_file),
            output=out,
            show_progress=False,
        )
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
