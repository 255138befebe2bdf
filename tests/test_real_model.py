"""The real built-in model, smollm2-135m (fetched once from PyPI into the default cache).

Marked `real`: part of the default run (about a minute once cached), deselect with -m "not real".
"""

import math
import urllib.request

import pytest
import torch

from memtool import MeasureConfig, load_model, measure

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m")


def test_default_model_is_smollm_and_greedy_knows_paris(smollm):
    assert smollm.kind == "builtin"
    assert smollm.model.config.num_hidden_layers == 30
    ids = smollm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = smollm.model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in smollm.tokenizer.decode(out[0, ids.shape[1] :])


def test_cached_model_loads_without_network(smollm, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network touched on a cached run")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    again = load_model()  # the default
    assert again.path == smollm.path
    assert again.bytes_on_disk == smollm.bytes_on_disk


def test_wiki_perplexity_in_range_and_equal_to_plain_loop(smollm):
    report = measure(
        smollm, MeasureConfig(data="wiki", seq_len=256, max_windows=3, show_progress=False)
    )
    assert report.split == "evaluation"
    assert 6 < report.perplexity < 30
    assert report.params_total == 134_515_008
    assert report.bytes_on_disk == pytest.approx(269e6, rel=0.01)  # bf16 checkpoint
    assert report.bits_per_weight == 32.0  # loaded in float32
    from memtool.data import evaluation_windows

    windows = evaluation_windows("wiki", smollm.tokenizer, 256, 3).input_ids
    with torch.no_grad():
        losses = [smollm.model(w[None], labels=w[None]).loss.item() for w in windows]
    assert f"{report.perplexity:.4g}" == f"{math.exp(sum(losses) / len(losses)):.4g}"


def test_gguf_file_loads_directly(smollm):
    from memtool.models.builtin import BUILTIN_MODELS
    from memtool.paths import models_dir

    asset = BUILTIN_MODELS["smollm2-135m"].asset
    gguf = models_dir() / "smollm2-135m-gguf" / asset.member.rsplit("/", 1)[-1]
    loaded = load_model(gguf)
    assert loaded.kind == "gguf" and loaded.bytes_on_disk == gguf.stat().st_size
    ids = torch.tensor([[504, 3575, 282, 4649, 314]])  # "The capital of France is"
    with torch.no_grad():
        ours, reference = loaded.model(ids).logits, smollm.model(ids).logits
    # The cache holds the same weights rounded to bfloat16: close, not equal.
    assert torch.equal(ours[0, -1].argmax(), reference[0, -1].argmax())
    assert (ours - reference).abs().max() < 0.05 * reference.abs().max()
