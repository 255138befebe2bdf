"""The compute dtype of calibration forwards: resolution per hardware, and validation."""

import pytest
import torch

from memtool.compress import BitStackConfig, GPTQConfig
from memtool.compress.precision import autocast_to, dtype_name, resolve_compute_dtype
from memtool.errors import MemtoolError


def test_compute_dtype_follows_the_setting_and_the_hardware(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_compute_dtype("float32", cpu) is None
    assert resolve_compute_dtype("bfloat16", cpu) is torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_compute_dtype("auto", cpu) is None  # emulated bfloat16 is slower than float32
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert resolve_compute_dtype("auto", cpu) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_compute_dtype("auto", cuda) is None
    assert dtype_name(None) == "float32" and dtype_name(torch.bfloat16) == "bfloat16"


@pytest.mark.parametrize(
    "config", [BitStackConfig(stats_dtype="fp8"), GPTQConfig(stats_dtype="fp8")]
)
def test_an_unknown_compute_dtype_is_refused(config):
    with pytest.raises(MemtoolError, match="--stats-dtype 'fp8' must be auto, float32"):
        config.validate()


def test_autocast_to_runs_matmuls_in_the_dtype_and_none_leaves_them():
    a = torch.randn(4, 8)
    with autocast_to("cpu", torch.bfloat16):
        assert (a @ a.T).dtype == torch.bfloat16
    with autocast_to("cpu", None):
        assert (a @ a.T).dtype == torch.float32
