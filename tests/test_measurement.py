"""`measure` as a library call, on tiny models and a text file."""

import math

import pytest
import torch

from memtool import MeasureConfig, MemtoolError, measure
from memtool.measurement import threshold_failures
from memtool.models import load_model


def _plain_loop_ppl(folder, text, seq_len, n_windows):
    loaded = load_model(folder)
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = torch.tensor(ids[: (len(ids) // seq_len) * seq_len]).view(-1, seq_len)[:n_windows]
    with torch.no_grad():
        losses = [loaded.model(w[None], labels=w[None]).loss.item() for w in windows]
    return math.exp(sum(losses) / len(losses)), len(windows)


def test_measure_reports_everything(tiny_llama_dir, text_file):
    config = MeasureConfig(data=str(text_file), seq_len=32, max_windows=4, show_progress=False)
    report = measure(str(tiny_llama_dir), config)
    expected, n = _plain_loop_ppl(tiny_llama_dir, text_file.read_text(), 32, 4)
    assert report.perplexity == pytest.approx(expected, rel=1e-6)
    assert report.windows == n == 4
    assert report.eval_tokens == 4 * 32 and report.predicted_tokens == 4 * 31
    assert report.split == "all" and str(text_file) in report.data
    assert report.available_tokens >= report.eval_tokens
    assert report.weight_bytes == 4 * report.params_total
    assert report.bits_per_weight == 32.0
    assert report.bytes_on_disk > 0 and report.peak_rss_bytes > 0 and report.tokens_per_s > 0
    keys = {
        "perplexity",
        "eval_tokens",
        "params_total",
        "params_non_embedding",
        "bytes_on_disk",
        "weight_bytes",
        "bits_per_weight",
        "peak_rss_bytes",
        "tokens_per_s",
        "data",
        "seq_len",
        "split",
        "protocol",
    }
    assert keys <= set(report.to_dict())


def test_measure_accepts_a_loaded_model_and_bf16(tiny_opt_dir, text_file):
    loaded = load_model(tiny_opt_dir, dtype="bfloat16")
    report = measure(
        loaded, MeasureConfig(data=str(text_file), seq_len=16, max_windows=2, show_progress=False)
    )
    assert report.dtype == "bfloat16" and report.bits_per_weight == 16.0
    assert math.isfinite(report.perplexity)


def test_thresholds(tiny_llama_dir, text_file):
    report = measure(
        str(tiny_llama_dir),
        MeasureConfig(data=str(text_file), seq_len=16, max_windows=1, show_progress=False),
    )
    assert threshold_failures(report, max_perplexity=report.perplexity * 2) == []
    assert threshold_failures(report, max_perplexity=report.perplexity / 2)
    assert threshold_failures(report, max_weight_bytes=report.weight_bytes - 1)
    assert threshold_failures(report, max_weight_bytes=report.weight_bytes) == []


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"seq_len": 0}, "--seq-len must be a positive"),
        ({"seq_len": -4}, "--seq-len must be a positive"),
        ({"max_windows": 0}, "--max-windows must be a positive"),
        ({"batch_size": -1}, "--batch-size must be a positive"),
        ({"seq_len": 4096}, "above the model's context of 128"),
    ],
)
def test_bad_settings(tiny_llama_dir, text_file, overrides, match):
    config = MeasureConfig(data=str(text_file), show_progress=False, **overrides)
    with pytest.raises(MemtoolError, match=match):
        measure(str(tiny_llama_dir), config)


def test_text_shorter_than_one_window(tiny_llama_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Just a few words.")
    with pytest.raises(MemtoolError, match="window"):
        measure(
            str(tiny_llama_dir), MeasureConfig(data=str(short), seq_len=64, show_progress=False)
        )
