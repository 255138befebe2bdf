"""The BitStack stack on disk: budgets, exact byte accounting, resizing in place, damage."""

import itertools
import json
import shutil

import pytest
import torch

from memtool import load_model
from memtool.compress import BitStackConfig, CalibrationConfig, compress
from memtool.errors import MemtoolError
from memtool.formats.bitstack_stack import STACK_FILE, StackFile, block_name
from memtool.measurement import MeasureConfig, measure, measure_budgets
from memtool.metrics.sizes import weight_bytes
from memtool.models.safetensors_check import check_safetensors


@pytest.fixture(scope="module")
def stack_dir(tmp_path_factory, tiny_llama_dir, text_file):
    out = tmp_path_factory.mktemp("bitstack") / "stack"
    calibration = CalibrationConfig(data=str(text_file), n_samples=8, seq_len=32, batch_size=4)
    compress(tiny_llama_dir, BitStackConfig(niter=4), calibration, output=out, show_progress=False)
    return out


def _logits(loaded, ids):
    with torch.inference_mode():
        return loaded.model(input_ids=ids).logits


IDS = torch.randint(2, 200, (2, 24), generator=torch.Generator().manual_seed(0))


def test_blocks_are_stored_in_stack_order_as_one_contiguous_prefix(stack_dir):
    stack = StackFile(stack_dir)
    header = check_safetensors(stack_dir / STACK_FILE)
    offsets = [header[block_name(i)]["data_offsets"] for i in range(len(stack.stack))]
    assert offsets[0][0] == 0
    assert all(a[1] == b[0] for a, b in itertools.pairwise(offsets))
    # Every linear's first block comes first, and a linear's blocks stay in order.
    assert [entry[1] for entry in stack.stack[: stack.min_blocks]] == [0] * stack.min_blocks
    for linear in range(len(stack.linears)):
        levels = [entry[1] for entry in stack.stack if entry[0] == linear]
        assert levels == list(range(4))


def test_every_budget_holds_exactly_the_bytes_the_metadata_promises(stack_dir):
    stack = StackFile(stack_dir)
    assert stack.weight_bytes == sorted(stack.weight_bytes)
    for k in (0, 5, len(stack.weight_bytes) - 1):
        loaded = load_model(stack_dir, budget=stack.weight_bytes[k])
        assert loaded.bitstack.n_blocks == stack.min_blocks + k
        assert weight_bytes(loaded.model) == stack.weight_bytes[k] == loaded.bitstack.weight_bytes
        # The base stays in 16 bits while the model computes in float32.
        assert loaded.model.get_input_embeddings().parametrizations.weight.original.dtype in (
            torch.bfloat16,
            torch.float16,
        )
        assert loaded.model.get_input_embeddings().weight.dtype == torch.float32
    # A budget between two prefixes takes the larger that fits.
    between = load_model(stack_dir, budget=stack.weight_bytes[3] - 1)
    assert between.bitstack.n_blocks == stack.min_blocks + 2


def test_budgets_outside_the_stack_are_refused_with_the_limits(stack_dir):
    stack = StackFile(stack_dir)
    with pytest.raises(MemtoolError, match=rf"below this stack's minimum .*\({stack.min_bytes} "):
        load_model(stack_dir, budget=stack.min_bytes - 1)
    with pytest.raises(MemtoolError, match=rf"above the full stack .*{stack.max_bytes} bytes"):
        load_model(stack_dir, budget=stack.max_bytes + 1)
    with pytest.raises(MemtoolError, match="applies to BitStack stacks"):
        load_model(stack_dir.parent / "nothing-here", budget="1MB")


def test_more_blocks_approximate_the_dense_model_better(stack_dir, tiny_llama_dir):
    dense = _logits(load_model(tiny_llama_dir), IDS)
    stack = StackFile(stack_dir)
    errors = []
    for budget in (stack.min_bytes, stack.weight_bytes[len(stack.weight_bytes) // 2], None):
        logits = _logits(load_model(stack_dir, budget=budget), IDS)
        errors.append(float((logits - dense).norm() / dense.norm()))
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 0.5 * errors[0]


def test_resizing_in_place_equals_a_fresh_load_exactly(stack_dir):
    stack = StackFile(stack_dir)
    sizes = stack.weight_bytes
    loaded = load_model(stack_dir, budget=sizes[len(sizes) // 2])
    for budget in (sizes[-1], sizes[0], sizes[7], sizes[2], sizes[len(sizes) // 3]):
        assert loaded.model.set_budget(budget) == stack.blocks_for_budget(budget)
    fresh = load_model(stack_dir, budget=sizes[len(sizes) // 3])
    assert torch.equal(_logits(loaded, IDS), _logits(fresh, IDS))
    assert weight_bytes(loaded.model) == weight_bytes(fresh.model)
    with pytest.raises(MemtoolError, match="below this stack's minimum"):
        loaded.set_budget(sizes[0] - 1)
    assert torch.equal(
        _logits(loaded, IDS), _logits(fresh, IDS)
    )  # a refused resize changes nothing


def test_a_budget_reads_only_its_blocks_and_checks_them(stack_dir, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(stack_dir, damaged)
    stack = StackFile(damaged)
    header = check_safetensors(damaged / STACK_FILE)
    header_bytes = int.from_bytes((damaged / STACK_FILE).read_bytes()[:8], "little")
    last = header[block_name(len(stack.stack) - 1)]["data_offsets"][0]
    with open(damaged / STACK_FILE, "r+b") as handle:  # flip one byte of the last block
        handle.seek(8 + header_bytes + last)
        byte = handle.read(1)
        handle.seek(8 + header_bytes + last)
        handle.write(bytes([byte[0] ^ 0xFF]))
    small = load_model(damaged, budget=stack.weight_bytes[-2])  # never reads the last block
    assert small.bitstack.n_blocks == len(stack.stack) - 1
    with pytest.raises(MemtoolError, match=f"block {len(stack.stack) - 1} fails its checksum"):
        small.set_budget(None)
    with pytest.raises(MemtoolError, match="fails its checksum"):
        load_model(damaged)


def test_a_truncated_stack_is_detected(stack_dir, tmp_path):
    cut = tmp_path / "cut"
    shutil.copytree(stack_dir, cut)
    data = (cut / STACK_FILE).read_bytes()
    (cut / STACK_FILE).write_bytes(data[:-100])
    with pytest.raises(MemtoolError, match="truncated or damaged"):
        load_model(cut, budget=StackFile(stack_dir).min_bytes)


def test_metadata_that_disagrees_with_the_file_is_detected(stack_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(stack_dir, bad)
    meta = json.loads((bad / "bitstack.json").read_text())
    meta["stack"][3][2] += 1
    (bad / "bitstack.json").write_text(json.dumps(meta))
    with pytest.raises(MemtoolError, match=r"does not match bitstack\.json at block 3"):
        load_model(bad)


def test_measure_reports_the_budget_and_a_sweep_resizes_one_model(stack_dir, text_file):
    stack = StackFile(stack_dir)
    config = MeasureConfig(data=str(text_file), seq_len=32, max_windows=2, show_progress=False)
    budgets = [stack.max_bytes, stack.min_bytes, stack.weight_bytes[6]]
    reports = measure_budgets(str(stack_dir), budgets, config)
    assert [r.budget_bytes for r in reports] == sorted(budgets)
    assert [r.weight_bytes for r in reports] == sorted(budgets)  # these budgets are exact
    # A random tiny model's perplexity says nothing about quality (the real-model tests do);
    # what matters here is that a resized model measures as a fresh load would.
    assert reports[0].perplexity != reports[-1].perplexity
    full = measure(str(stack_dir), config)
    assert full.stack_blocks == len(stack.stack)
    assert full.perplexity == pytest.approx(reports[-1].perplexity, rel=1e-6)
    assert all(r.kv_cache_bytes == 2 * 2 * 2 * 16 * 32 * 4 for r in reports)
    single = measure(str(stack_dir), config.__class__(**{**vars(config), "budget": budgets[2]}))
    assert single.stack_blocks == stack.blocks_for_budget(budgets[2])
    assert single.perplexity == pytest.approx(reports[1].perplexity, rel=1e-6)


def test_opt_stack_with_biases_round_trips(tiny_opt_dir, text_file, tmp_path):
    # OPT: biased linears, LayerNorm with bias, fc1 -> fc2 folded through the ReLU.
    calibration = CalibrationConfig(data=str(text_file), n_samples=4, seq_len=32, batch_size=4)
    out = tmp_path / "opt-stack"
    config = BitStackConfig(niter=6, score_samples=2)
    compress(tiny_opt_dir, config, calibration, output=out, show_progress=False)
    meta = json.loads((out / "bitstack.json").read_text())
    assert meta["scaling"]["explicit"] == []  # every OPT group folds exactly
    dense = _logits(load_model(tiny_opt_dir), IDS)
    loaded = load_model(out)
    fc1 = loaded.model.get_submodule("model.decoder.layers.0.fc1")
    assert fc1.bias is not None and fc1.bias.dtype in (torch.bfloat16, torch.float16)
    full = _logits(loaded, IDS)
    loaded.set_budget(StackFile(out).min_bytes)
    smallest = _logits(loaded, IDS)
    assert (full - dense).norm() < (smallest - dense).norm()
    assert weight_bytes(loaded.model) == StackFile(out).min_bytes


def test_a_loaded_stack_generates_with_the_kv_cache(stack_dir):
    loaded = load_model(stack_dir, budget=StackFile(stack_dir).weight_bytes[4])
    prompt = IDS[:1, :8]
    out = loaded.model.generate(prompt, max_new_tokens=4, do_sample=False)
    # Cached decoding agrees with full forwards over the growing sequence.
    for step in range(4):
        logits = _logits(loaded, out[:, : 8 + step])
        assert int(logits[0, -1].argmax()) == int(out[0, 8 + step])
