import math

import pytest
import torch

from memtool.metrics import (
    count_params,
    linear_bits_per_weight,
    model_bits_per_weight,
    perplexity,
    weight_bytes,
)
from memtool.models import load_model


def test_counts_on_tied_llama(tiny_llama_dir):
    model = load_model(tiny_llama_dir).model
    unique = {id(p): p for p in model.parameters()}.values()
    total, non_embedding = count_params(model)
    assert total == sum(p.numel() for p in unique)
    embed = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is embed  # tied: counted once
    assert non_embedding == total - embed.numel()
    assert weight_bytes(model) == 4 * total
    assert model_bits_per_weight(model) == 32.0
    assert linear_bits_per_weight(model) == 32.0


def test_counts_on_opt_exclude_position_table(tiny_opt_dir):
    model = load_model(tiny_opt_dir, dtype="bfloat16").model
    total, non_embedding = count_params(model)
    tables = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    assert non_embedding == total - tables
    assert model_bits_per_weight(model) == 16.0


def test_compressed_layer_reports_its_own_bytes(tiny_llama_dir):
    model = load_model(tiny_llama_dir).model
    before_total, _ = count_params(model)
    before_bytes = weight_bytes(model)
    target = model.model.layers[0].mlp.down_proj
    weights = target.weight.numel()

    class Packed(torch.nn.Module):  # stands in for a 4-bit layer: half a byte per weight
        def __init__(self):
            super().__init__()
            self.register_buffer("packed", torch.zeros(weights // 2, dtype=torch.uint8))

        def logical_weight_count(self):
            return weights

        def weight_storage_bytes(self):
            return weights // 2

    model.model.layers[0].mlp.down_proj = Packed()
    assert count_params(model)[0] == before_total
    assert weight_bytes(model) == before_bytes - 4 * weights + weights // 2
    assert linear_bits_per_weight(model) < 32.0


def test_perplexity_matches_plain_transformers_loss(tiny_llama_dir):
    model = load_model(tiny_llama_dir).model
    torch.manual_seed(0)
    windows = torch.randint(0, model.config.vocab_size, (3, 24))
    result = perplexity(model, windows, batch_size=2, show_progress=False)
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss.item() for w in windows]
    assert result.perplexity == pytest.approx(math.exp(sum(losses) / 3), rel=1e-6)
    assert result.predicted_tokens == 3 * 23
    assert result.fed_tokens == 72
    assert result.tokens_per_s > 0
