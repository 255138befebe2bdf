"""BitStack on the real model: quality grows with the budget, importance order beats uniform.

A small stack (4 blocks per linear, 8 x 256 calibration tokens) keeps this near a minute; the
full-size curve is `benchmarks/bitstack_curve.py`.
"""

import pytest
import torch

from memtool import load_model
from memtool.compress import BitStackConfig, CalibrationConfig, compress
from memtool.data import evaluation_windows
from memtool.formats.bitstack_linear import BitStackLinear
from memtool.metrics import perplexity
from memtool.metrics.sizes import weight_bytes

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def real_stack(tmp_path_factory):
    out = tmp_path_factory.mktemp("real-bitstack") / "stack"
    config = BitStackConfig(niter=4, score_samples=4)
    calibration = CalibrationConfig(n_samples=8, seq_len=256, batch_size=4)
    compress("smollm2-135m", config, calibration, output=out, show_progress=False)
    return out


def test_importance_order_beats_uniform_at_equal_bytes_and_more_bytes_help(real_stack):
    loaded = load_model(real_stack)
    windows = evaluation_windows("wiki", loaded.tokenizer, seq_len=256, max_windows=4).input_ids

    def ppl(model):
        return perplexity(model, windows, 4, show_progress=False).perplexity

    full = ppl(loaded.model)
    stack = loaded.bitstack.stack
    per_level = sum(spec.block_bytes for spec in stack.linears)
    uniform_bytes = stack.meta["base_bytes"] + 2 * per_level  # every linear at 2 blocks
    loaded.set_budget(uniform_bytes)
    ordered = ppl(loaded.model)
    assert weight_bytes(loaded.model) <= uniform_bytes
    loaded.set_budget(stack.min_bytes)
    smallest = ppl(loaded.model)
    uniform = load_model(real_stack)
    for module in uniform.model.modules():
        if isinstance(module, BitStackLinear):
            module.keep_blocks(2)
    assert weight_bytes(uniform.model) == uniform_bytes
    level_two = ppl(uniform.model)
    assert smallest > ordered > full
    assert ordered < 0.8 * level_two, (ordered, level_two)
    assert torch.isfinite(torch.tensor(full)) and full < 100
