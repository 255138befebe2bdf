"""Fine-tuning the real built-in model (smollm2-135m) on wiki: a few steps lower the loss on
the batch trained, the export keeps the tokenizer and the tied head, and `measure` reads it."""

import pytest
import torch

from memtool import MeasureConfig, load_model, measure
from memtool.train.config import OptimConfig, TrainConfig
from memtool.train.loop import train

pytestmark = pytest.mark.real


def test_fine_tune_smollm_on_wiki_and_measure_the_export(tmp_path):
    config = TrainConfig(
        data="wiki",
        steps=2,
        batch_size=2,
        seq_len=64,
        zero=2,  # fp32: bf16 matmuls are several times slower than fp32 on CPUs without AMX
        optim=OptimConfig(lr=5e-5),
    )
    result = train(config, tmp_path, model="smollm2-135m", show_progress=False)
    assert result.steps == 2 and all(2.0 < loss < 5.0 for loss in result.losses)
    loaded = load_model(result.model_dir)
    assert loaded.tokenizer("Paris")["input_ids"]  # the tokenizer came along
    model = loaded.model
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    report = measure(loaded, MeasureConfig(data="wiki", seq_len=128, max_windows=2))
    base = measure(load_model(), MeasureConfig(data="wiki", seq_len=128, max_windows=2))
    # two small steps on wiki text: the model is intact (within 10% of the base perplexity)
    assert abs(report.perplexity / base.perplexity - 1) < 0.10
    assert torch.isfinite(torch.tensor(report.perplexity))
