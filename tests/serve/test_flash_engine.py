"""The flash engine: tokens equal the masked dense model's, the budget holds, damage is caught,
and `compress --method flash-store` / `serve-local --memory-budget` work end to end."""

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from memtool.cli.app import app
from memtool.errors import MemtoolError
from memtool.formats.flash_store import FFN_FILE, RESIDENT_FILE, write_flash_store
from memtool.models import load_model
from memtool.serve import GenerationParams, InMemoryEngine, complete
from memtool.serve.flash import build as build_module
from memtool.serve.flash.build import build_flash_store, ensure_flash_store
from memtool.serve.flash.engine import (
    FlashConfig,
    FlashEngine,
    build_selectors,
    greedy_decode,
    greedy_steps,
    open_flash_model,
    summarize_tokens,
)
from memtool.serve.flash.io import MAX_READ_BYTES
from memtool.serve.flash.reference import masked_dense

runner = CliRunner()
PROMPT = [5, 17, 42, 99, 7, 3]


def _store(folder, model_dir, dtype=torch.float32):
    """A store of the tiny model, predictors calibrated on random ids (fp32: bit-comparable)."""
    loaded = load_model(model_dir)
    ids = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(0))
    build_flash_store(loaded, folder, input_ids=ids, dtype=dtype, show=False)
    return folder


@pytest.fixture(scope="module", params=["llama", "opt"])
def store(request, tmp_path_factory, tiny_llama_dir, tiny_opt_dir):
    model_dir = tiny_llama_dir if request.param == "llama" else tiny_opt_dir
    return _store(tmp_path_factory.mktemp("flash") / request.param, model_dir), model_dir


def _tight(folder, neurons: int, sparsity: str, staging_bytes: int = 8192) -> int:
    """The budget with room for exactly `neurons` per layer's window."""
    config = FlashConfig(
        memory_budget="1GB", sparsity=sparsity, context_tokens=64, staging_bytes=staging_bytes
    )
    roomy = open_flash_model(folder, config)
    plan, n_layers = roomy.plan, len(roomy.ffns)
    roomy.close()
    per_neuron = n_layers * (plan.windows // (n_layers * plan.capacity) + 16)
    fixed = plan.total - plan.windows - 16 * n_layers * plan.capacity
    return fixed + neurons * per_neuron


@pytest.mark.parametrize("sparsity", ["dense", "auto"])
@pytest.mark.parametrize("room", ["all", "few"])
@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("lookahead", [True, False])
def test_tokens_equal_the_masked_dense_model(store, sparsity, room, window, lookahead):
    folder, model_dir = store
    # "few": 6 neurons per layer, so most tokens stream their neurons from the staging buffer
    budget = "1GB" if room == "all" else _tight(folder, 6, sparsity)
    config = FlashConfig(
        memory_budget=budget,
        sparsity=sparsity,
        window_tokens=window,
        context_tokens=64,
        staging_bytes=8192,
        lookahead=lookahead,
    )
    flash = open_flash_model(folder, config)
    assert flash.plan.total <= flash.plan.budget
    if room == "few":
        assert flash.plan.capacity == 6
    got, _ = greedy_decode(flash, PROMPT, 16)
    reference = load_model(model_dir).model
    selectors, _ = build_selectors(folder, reference, sparsity)
    with masked_dense(reference, selectors):
        want, _ = greedy_decode(reference, PROMPT, 16)
        with torch.no_grad():
            want_logits = reference(torch.tensor([PROMPT])).logits
    with torch.no_grad():
        got_logits = flash.model(torch.tensor([PROMPT])).logits
    assert got == want
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    counters = flash.counters
    assert counters.neurons_hit + counters.neurons_loaded == counters.neurons_active
    if window == 0:
        assert counters.neurons_hit == 0
    if not lookahead:
        assert counters.neurons_prefetched == 0
    elif window == 0:  # nothing kept between tokens: each token's guessed neurons read ahead
        assert counters.neurons_prefetched > 0
    assert counters.neurons_prefetched <= counters.neurons_loaded
    flash.close()


def test_greedy_steps_measure_each_forward(store):
    _, model_dir = store
    model = load_model(model_dir).model
    calls = []
    tick = iter(range(0, 1000, 10))
    steps = greedy_steps(model, PROMPT, 3, lambda: calls.append(1), lambda: {"n": next(tick)})
    ids, _ = greedy_decode(model, PROMPT, 3)
    assert [s["token"] for s in steps] == ids and len(calls) == 3
    assert all(s["n"] == 10 and s["seconds"] > 0 and s["before_seconds"] >= 0 for s in steps)
    with pytest.raises(MemtoolError, match="new_tokens must be at least 1"):
        greedy_steps(model, PROMPT, 0)


def test_sparsity_selects_fewer_neurons_than_dense(store):
    folder, _ = store
    loaded = {}
    for sparsity in ("dense", "auto"):
        flash = open_flash_model(
            folder, FlashConfig(memory_budget="1GB", sparsity=sparsity, context_tokens=64)
        )
        greedy_decode(flash, PROMPT, 4)
        loaded[sparsity] = flash.counters.neurons_active
        flash.close()
    assert loaded["auto"] < loaded["dense"]


def test_dense_flash_engine_answers_like_the_in_memory_engine(tiny_llama_dir, tmp_path):
    folder = _store(tmp_path / "store", tiny_llama_dir)
    flash = open_flash_model(folder, FlashConfig(memory_budget="2MB", sparsity="dense"))
    engine = FlashEngine(flash)
    params = GenerationParams(max_tokens=10)
    want = complete(InMemoryEngine(load_model(tiny_llama_dir)), "the river", params)
    got = complete(engine, "the river", params)
    assert got.text == want.text
    stats = summarize_tokens(engine.token_log)
    assert stats["tokens"] == got.completion_tokens
    assert stats["bytes_read_per_token"] >= 0 and 0 <= stats["cache_hit_rate"] <= 1
    assert engine.context_length == flash.plan.context_tokens


def test_budget_below_the_minimum_names_it(store):
    folder, _ = store
    with pytest.raises(MemtoolError, match=r"below the minimum [\d,]+ .*resident weights"):
        open_flash_model(folder, FlashConfig(memory_budget="1KB"))
    with pytest.raises(MemtoolError, match="percentage"):
        open_flash_model(folder, FlashConfig(memory_budget="half%"))


def test_percent_budget_and_plan_add_up(store):
    folder, _ = store
    config = FlashConfig(memory_budget="100%", context_tokens=32, staging_bytes=8192)
    flash = open_flash_model(folder, config)
    plan = flash.plan
    assert plan.budget == plan.model_weight_bytes
    assert plan.total <= plan.budget
    window_bytes = sum(f.window.buffer_bytes for f in flash.ffns)
    assert window_bytes == plan.windows
    assert flash.describe()["budget"]["kv_cache"] == plan.kv_cache
    flash.close()


def test_sparsity_choices_are_checked(store, tmp_path, tiny_llama_dir):
    folder, _ = store
    with pytest.raises(MemtoolError, match="sparsity"):
        open_flash_model(folder, FlashConfig(memory_budget="1GB", sparsity="0.55"))
    bare = tmp_path / "bare"  # a store without predictors serves dense only
    write_flash_store(load_model(tiny_llama_dir).model, bare, dtype=torch.float32)
    with pytest.raises(MemtoolError, match="no calibrated thresholds"):
        open_flash_model(bare, FlashConfig(memory_budget="1GB"))
    open_flash_model(bare, FlashConfig(memory_budget="1GB", sparsity="dense")).close()


def test_damaged_and_truncated_stores_are_refused(store, tmp_path):
    folder, _ = store
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    with open(damaged / RESIDENT_FILE, "r+b") as handle:
        handle.seek(-8, 2)
        handle.write(b"\xff" * 8)
    with pytest.raises(MemtoolError, match="CRC32"):
        open_flash_model(damaged, FlashConfig(memory_budget="1GB"))
    # A flipped byte inside the neuron file: found when the store is verified before serving.
    flipped = tmp_path / "flipped"
    shutil.copytree(folder, flipped)
    with open(flipped / FFN_FILE, "r+b") as handle:
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 0xFF]))
    open_flash_model(flipped, FlashConfig(memory_budget="1GB")).close()  # sizes alone: unseen
    with pytest.raises(MemtoolError, match="layer 0 fails its CRC32"):
        open_flash_model(flipped, FlashConfig(memory_budget="1GB", verify_store=True))
    open_flash_model(folder, FlashConfig(memory_budget="1GB", verify_store=True)).close()
    truncated = tmp_path / "truncated"
    shutil.copytree(folder, truncated)
    with open(truncated / FFN_FILE, "r+b") as handle:
        handle.truncate(1000)
    with pytest.raises(MemtoolError, match="truncated"):
        open_flash_model(truncated, FlashConfig(memory_budget="1GB"))


def test_ensure_flash_store_builds_once_per_model_version(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MEMTOOL_HOME", str(tmp_path / "home"))
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model_dir)
    built = []

    def fake_compress(source, output, config, show=True):
        built.append(source)
        _store(output, source)

    monkeypatch.setattr(build_module, "compress_flash_store", fake_compress)
    first = ensure_flash_store(str(model_dir), show=False)
    assert ensure_flash_store(str(model_dir), show=False) == first
    assert ensure_flash_store(str(first)) == first  # a store serves as itself
    assert len(built) == 1
    weights = next(model_dir.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes())  # same bytes, new mtime: a new version
    import os

    os.utime(weights, ns=(1, 1))
    assert ensure_flash_store(str(model_dir), show=False) != first
    assert len(built) == 2
    with pytest.raises(MemtoolError, match=r"compress .* --method flash-store"):
        ensure_flash_store("org/not-here", show=False)


def test_cli_compress_then_serve_with_a_budget(tiny_llama_dir, text_file, tmp_path):
    out = tmp_path / "store"
    result = runner.invoke(
        app,
        [
            "compress",
            str(tiny_llama_dir),
            "--method",
            "flash-store",
            "-o",
            str(out),
            "--calib",
            str(text_file),
            "--calib-samples",
            "4",
            "--seq-len",
            "32",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["method"] == "flash-store" and summary["kind"] == "swiglu"
    assert summary["predictor"] == "quant:4"
    calibration = summary["calibration"]  # named like every calibrated output's
    assert (calibration["split"], calibration["tokens"], calibration["seed"]) == ("all", 128, 0)
    assert len(calibration["fingerprint"]) >= 8
    result = runner.invoke(
        app,
        [
            "serve-local",
            str(out),
            "--memory-budget",
            "600KB",
            "--window",
            "2",
            "--io-threads",
            "2",
            "--verify-store",
            "--prompt",
            "the river",
            "--max-tokens",
            "6",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    flash = payload["flash"]
    assert flash["sparsity"] == "predictor:0.5"
    # The start-up line names the gap measured on this device, as --json does.
    assert flash["gap_measurement"]["gap_bytes"] == flash["gap_bytes"]
    assert "reading through gaps up to" in " ".join(result.stderr.split())
    assert flash["budget"]["total"] <= flash["budget"]["budget"]
    per_token = flash["per_token"]
    for key in (
        "bytes_read_per_token",
        "reads_per_token",
        "mean_read_bytes",
        "neurons_loaded_per_token",
        "cache_hit_rate",
        "io_seconds_per_token",
        "memory_seconds_per_token",
        "compute_seconds_per_token",
        "neurons_prefetched_per_token",
    ):
        assert key in per_token
    assert payload["peak_rss_bytes"] > 0
    assert flash["lookahead"] is False and per_token["neurons_prefetched_per_token"] == 0
    assert "lookahead on" not in result.stderr
    serve = ["serve-local", str(out), "--memory-budget", "600KB", "--prompt", "the river"]
    result = runner.invoke(app, [*serve, "--max-tokens", "4", "--lookahead", "--json"])
    assert result.exit_code == 0, result.stderr
    flash = json.loads(result.stdout)["flash"]
    assert flash["lookahead"] is True
    assert "lookahead on" in " ".join(result.stderr.split())
    result = runner.invoke(
        app, ["serve-local", str(out), "--memory-budget", "1KB", "--prompt", "x"]
    )
    assert result.exit_code == 2
    assert "below the minimum" in result.stderr
    result = runner.invoke(app, ["serve-local", str(out), "--window", "2", "--prompt", "x"])
    assert result.exit_code != 0
    assert "--window applies to --memory-budget" in result.stderr
    result = runner.invoke(app, ["serve-local", str(out), "--verify-store", "--prompt", "x"])
    assert result.exit_code == 2 and "--verify-store applies to --memory-budget" in result.stderr
    result = runner.invoke(app, ["serve-local", str(out), "--lookahead", "--prompt", "x"])
    assert result.exit_code == 2 and "--no-lookahead applies to --memory-budget" in result.stderr


def test_the_openai_server_serves_a_flash_engine(tiny_llama_dir, tmp_path):
    from fastapi.testclient import TestClient

    from memtool.serve.server import ServerConfig, create_app

    folder = _store(tmp_path / "store", tiny_llama_dir)
    engine = FlashEngine(open_flash_model(folder, FlashConfig(memory_budget="2MB")))
    want = complete(engine, "the river", GenerationParams(max_tokens=8)).text
    app = create_app(engine, ServerConfig(default_temperature=0.0))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        body = client.post("/v1/completions", json={"prompt": "the river", "max_tokens": 8})
        assert body.status_code == 200
        assert body.json()["choices"][0]["text"] == want
        too_long = client.post(
            "/v1/completions", json={"prompt": "the river " * 200, "max_tokens": 8}
        )
        assert too_long.status_code == 400  # the planned context, not the model's, is the limit


@pytest.mark.parametrize("model", ["llama", "opt"])
def test_bf16_tokens_equal_the_dense_model_under_the_recorded_masks(
    model, tiny_llama_dir, tiny_opt_dir, tmp_path
):
    """In bf16 a recomputed threshold can flip on a rounding difference; with the masks the
    flash run applied, recorded and replayed, the dense model must give the same tokens."""
    model_dir = tiny_llama_dir if model == "llama" else tiny_opt_dir
    folder = _store(tmp_path / "store", model_dir, dtype=torch.bfloat16)
    budget = _tight(folder, 6, "auto")
    config = FlashConfig(memory_budget=budget, context_tokens=64, staging_bytes=8192)
    flash = open_flash_model(folder, config)
    for ffn in flash.ffns:
        ffn.recorded = []
    got, _ = greedy_decode(flash, PROMPT, 16)
    recorded = [list(ffn.recorded) for ffn in flash.ffns]
    assert [m.shape for m in recorded[0][:2]] == [(len(PROMPT), flash.plan.n_neurons), (1, 128)]
    reference = load_model(model_dir, dtype="bfloat16").model
    selectors, _ = build_selectors(folder, reference, "auto")
    with masked_dense(reference, selectors, recorded):
        want, _ = greedy_decode(reference, PROMPT, 16)
    assert got == want
    assert all(not masks for masks in recorded)  # every recorded call was replayed


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_gate_resident_store_selects_exactly_and_matches_the_masked_dense_model(
    arch, tiny_llama_dir, tiny_opt_dir, tmp_path
):
    from memtool.serve.flash.build import FlashStoreConfig

    model_dir = tiny_llama_dir if arch == "llama" else tiny_opt_dir
    loaded = load_model(model_dir)
    ids = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(0))
    folder = tmp_path / "gate"
    config = FlashStoreConfig(gate_resident=True)
    build_flash_store(loaded, folder, config, input_ids=ids, dtype=torch.float32, show=False)
    flash = open_flash_model(folder, FlashConfig(memory_budget="1GB", context_tokens=64))
    assert flash.sparsity.mode == "cats" and flash.plan.predictors == 0
    got, _ = greedy_decode(flash, PROMPT, 12)
    reference = load_model(model_dir).model
    selectors, _ = build_selectors(folder, reference, "auto")
    with masked_dense(reference, selectors):
        want, _ = greedy_decode(reference, PROMPT, 12)
    assert got == want
    assert flash.counters.neurons_active < 0.7 * flash.plan.n_neurons * len(flash.ffns) * 17
    flash.close()
    if arch == "opt":  # exact: exactly the neurons whose pre-activation is positive
        fc1 = reference.model.decoder.layers[0].fc1
        x = torch.randn(3, fc1.in_features)
        mask, pre = selectors[0].mask(x)
        torch.testing.assert_close(pre, fc1(x))
        assert torch.equal(mask, fc1(x) > 0)


@pytest.mark.parametrize(
    ("gap_bytes", "staging_bytes", "guess"),
    [(None, 8192, "selector"), (1 << 20, 1 << 16, "scattered")],
)
def test_neurons_in_the_window_inside_a_streamed_span_count_once(
    store, gap_bytes, staging_bytes, guess
):
    """Scattered random masks leave window neurons between the misses, and the lookahead's
    bundles too; reads through those gaps must not add them a second time, nor put them in the
    window twice. "scattered": the lookahead reads every 16th neuron, and reads of the rest
    go through every gap (1 MiB) in long loads, so they span those too."""
    folder, model_dir = store
    config = FlashConfig(
        memory_budget=_tight(folder, 6, "dense", staging_bytes),
        sparsity="dense",
        window_tokens=3,
        context_tokens=64,
        staging_bytes=staging_bytes,
        gap_bytes=gap_bytes,
        lookahead=True,
    )
    flash = open_flash_model(folder, config)
    generator = torch.Generator().manual_seed(3)
    for ffn in flash.ffns:
        ffn.recorded = []
        n = ffn.window.neuron_row.numel()
        ffn.selector.mask = lambda x, n=n: (
            torch.rand(x.shape[0], n, generator=generator) < 0.4,
            None,
        )
        if guess == "scattered":
            ffn.lookahead = lambda hidden, ffn=ffn, n=n: ffn.reader.prefetch(
                ffn._offset, ffn._stride, torch.arange(5, n, 16)
            )
    got, _ = greedy_decode(flash, PROMPT, 12)
    for ffn in flash.ffns:
        rows = ffn.window.neurons().tolist()
        assert len(rows) == len(set(rows))
    recorded = [list(ffn.recorded) for ffn in flash.ffns]
    reference = load_model(model_dir).model
    selectors, _ = build_selectors(folder, reference, "dense")
    with masked_dense(reference, selectors, recorded):
        want, _ = greedy_decode(reference, PROMPT, 12)
    assert got == want
    flash.close()


def test_the_gap_is_measured_at_open_unless_given(store):
    folder, _ = store
    flash = open_flash_model(folder, FlashConfig(memory_budget="1GB"))
    setup = flash.describe()
    assert setup["gap_measurement"]["gap_bytes"] == setup["gap_bytes"] == flash.reader.gap_bytes
    assert 0 <= setup["gap_bytes"] <= MAX_READ_BYTES // 2
    flash.close()
    flash = open_flash_model(folder, FlashConfig(memory_budget="1GB", gap_bytes=4096))
    assert flash.describe()["gap_bytes"] == 4096 and flash.gap_measurement is None
    flash.close()


def test_cli_gate_resident_store_reports_no_predictor(tiny_llama_dir, text_file, tmp_path):
    args = ["compress", str(tiny_llama_dir), "--method", "flash-store", "--gate-resident",
            "--calib", str(text_file), "--calib-samples", "2", "--seq-len", "32",
            "--json"]  # fmt: skip
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "store")])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["predictor"] == "none (gate resident)"
