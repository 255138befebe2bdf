"""bitsandbytes NF4/FP4/int8 through transformers: checkpoints transformers reads back."""

import json

import pytest
import torch

from memtool import load_model
from memtool.compress import BnbConfig, compress
from memtool.errors import MemtoolError
from memtool.metrics import count_params, linear_bits_per_weight


@pytest.mark.parametrize(("quant_type", "max_bits"), [("nf4", 5.0), ("fp4", 5.0), ("int8", 9.0)])
def test_bnb_round_trip(tiny_llama_dir, tmp_path, quant_type, max_bits):
    out = tmp_path / quant_type
    result, _, quantized = compress(
        str(tiny_llama_dir), BnbConfig(quant_type), output=out, show_progress=False
    )
    assert result.method == quant_type and result.quantized_layers == 2 * 7
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes"
    reloaded = load_model(out)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        a, b = quantized.model(ids).logits.float(), reloaded.model(ids).logits.float()
    assert torch.allclose(a, b, atol=1e-4)
    reference = load_model(tiny_llama_dir).model
    assert count_params(reloaded.model)[0] == count_params(reference)[0]  # logical weights
    assert linear_bits_per_weight(reloaded.model) < max_bits


def test_bnb_rejects_bits_mismatch():
    with pytest.raises(MemtoolError, match="unknown bitsandbytes type"):
        BnbConfig("nf3").validate()
