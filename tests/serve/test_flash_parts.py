"""The flash engine's parts: span planning, the O_DIRECT reader and the neuron window."""

import itertools
import random

import pytest
import torch

from memtool.errors import MemtoolError
from memtool.formats.flash_store import FFN_FILE, open_flash_store, write_flash_store
from memtool.serve.flash.io import MAX_READ_BYTES, NeuronReader, plan_spans
from memtool.serve.flash.window import NeuronWindow


def test_plan_spans_merges_small_gaps_and_caps_reads():
    ids = [0, 1, 2, 5, 6, 20, 21, 22, 23, 24, 25]
    spans = plan_spans(ids, gap_bundles=2, max_bundles=100)
    assert [(s.first, s.count, s.wanted) for s in spans] == [(0, 7, 5), (20, 6, 6)]
    exact = plan_spans(ids, gap_bundles=0, max_bundles=100)
    assert [(s.first, s.count) for s in exact] == [(0, 3), (5, 2), (20, 6)]
    capped = plan_spans(ids, gap_bundles=0, max_bundles=4)
    assert [(s.first, s.count) for s in capped] == [(0, 3), (5, 2), (20, 4), (24, 2)]
    assert sum(s.wanted for s in capped) == len(ids)
    assert plan_spans([], 3, 10) == []


@pytest.mark.parametrize("seed", range(6))
def test_planned_spans_cover_the_ids_within_the_rules(seed):
    """Random ids: every id in exactly one span; spans start and end on wanted ids, hold at
    most max_bundles, cross only gaps of at most gap_bundles, and a run is cut no more often
    than the cap needs."""
    rng = random.Random(seed)
    ids = sorted(rng.sample(range(3000), rng.randint(1, 900)))
    gap, cap = rng.choice([0, 1, 3, 18]), rng.choice([1, 5, 73, 5000])
    spans = plan_spans(ids, gap_bundles=gap, max_bundles=cap)
    wanted = set(ids)
    covered = []
    for span in spans:
        inside = [i for i in range(span.first, span.first + span.count) if i in wanted]
        assert inside[0] == span.first and inside[-1] == span.first + span.count - 1
        assert span.count <= cap and span.wanted == len(inside)
        assert all(b - a - 1 <= gap for a, b in itertools.pairwise(inside))
        covered += inside
    assert covered == ids
    # Spans split only by a wider gap or by the cap: a run (ids joined by gaps <= gap) of
    # extent E takes at most ceil(E / cap) reads.
    runs = [[spans[0]]]
    for left, right in itertools.pairwise(spans):
        same_run = right.first - (left.first + left.count) <= gap
        runs[-1].append(right) if same_run else runs.append([right])
    for run in runs:
        extent = run[-1].first + run[-1].count - run[0].first
        assert len(run) <= -(-extent // cap)


def _native_reader_or_skip() -> None:
    """The native reader is built with memtool's CPU kernels: skip only where no build tool is
    installed (as the kernels' own tests do); a broken build fails."""
    from memtool.ops.cpu.build import load_kernel

    usable, reason = load_kernel()
    if not usable:
        if reason.startswith(("no C++ compiler", "ninja is not installed")):
            pytest.skip(reason)
        pytest.fail(f"the CPU kernels did not build: {reason}")


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_llama_dir):
    from memtool.models import load_model

    folder = tmp_path_factory.mktemp("flash-parts") / "store"
    write_flash_store(load_model(tiny_llama_dir).model, folder, dtype=torch.float32)
    return folder


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("gap_bytes", [0, 4096, 1 << 20])
def test_reader_returns_the_bundles_the_plain_reader_does(store, direct, gap_bytes, native):
    if native:
        _native_reader_or_skip()
    plain = open_flash_store(store)
    layer = plain.layers[1]
    # A staging buffer of two spans' worth forces several parallel rounds.
    reader = NeuronReader(
        store / FFN_FILE,
        threads=3,
        direct=direct,
        gap_bytes=gap_bytes,
        staging_bytes=8192,
        native=native,
    )
    assert reader.native == native
    rng = random.Random(0)
    for _ in range(5):
        ids = sorted(rng.sample(range(layer["n_neurons"]), rng.randint(1, 40)))
        got = reader.read_bundles(layer["offset"], layer["stride_bytes"], ids)
        itemsize = 4
        parts = plain.read_neurons(1, ids)
        up = layer["layout"][1]
        start = up["offset_bytes"] // itemsize
        values = got.view(torch.float32)[:, start : start + up["numel"]]
        assert torch.equal(values, parts["up"])
    assert reader.stats.bytes_wanted <= reader.stats.bytes_read
    if gap_bytes == 0 and not direct:
        assert reader.stats.bytes_read == reader.stats.bytes_wanted  # exact reads
    reader.close()
    plain.close()


def test_reader_uses_o_direct_here_and_counts_reads(store):
    reader = NeuronReader(store / FFN_FILE, threads=2, gap_bytes=0)
    layer = open_flash_store(store, verify=False).layers[0]
    reader.read_bundles(layer["offset"], layer["stride_bytes"], [0, 1, 2, 10, 11, 40])
    # ext4 here takes O_DIRECT; a filesystem that refuses it falls back, and says so.
    assert reader.direct == (not reader.page_cache)
    assert reader.stats.reads == 3
    reader.close()


@pytest.mark.parametrize("native", [True, False])
def test_reader_reports_a_store_truncated_underneath(store, tmp_path, native):
    import shutil

    if native:
        _native_reader_or_skip()
    copy = tmp_path / "ffn.bin"
    shutil.copy(store / FFN_FILE, copy)
    layer = open_flash_store(store, verify=False).layers[1]
    reader = NeuronReader(copy, threads=1, direct=False, native=native)
    with open(copy, "r+b") as handle:
        handle.truncate(layer["offset"] + 2 * layer["stride_bytes"])
    with pytest.raises(MemtoolError, match="short read"):
        reader.read_bundles(layer["offset"], layer["stride_bytes"], [5])
    reader.close()


@pytest.mark.parametrize("native", [True, False])
def test_prefetched_bundles_are_the_stored_ones_and_never_overwritten(store, native):
    """A prefetch fills the staging buffer's first half; a stream started while the caller
    works on those bundles reads into the other half first; and any read that comes instead
    of `take_prefetch` waits for the prefetch and drops it (its bytes still counted)."""
    if native:
        _native_reader_or_skip()
    plain = open_flash_store(store, verify=False)
    layer = plain.layers[1]
    offset, stride = layer["offset"], layer["stride_bytes"]
    reader = NeuronReader(
        store / FFN_FILE, threads=2, gap_bytes=0, staging_bytes=8 * stride, native=native
    )
    # The reference rows, from another reader (read_bundles is checked against the store
    # above).
    other = NeuronReader(store / FFN_FILE, threads=1, gap_bytes=0, native=False)
    want = dict(enumerate(other.read_bundles(offset, stride, list(range(12)))))
    other.close()
    reads = reader.stats.reads
    assert reader.prefetch(offset, stride, [1, 2, 3, 7])
    ahead = reader.take_prefetch(offset)
    # A stream into the second half while the caller still works on the prefetched views.
    stream = reader.stream(offset, stride, [4, 5, 9], first_half=1)
    streamed = [(n.clone(), b.clone()) for n, b in stream]
    for neurons, block in [*ahead, *streamed]:  # the views still hold what was read
        for n, bundle in zip(neurons.tolist(), block, strict=True):
            assert torch.equal(bundle, want[n])
    assert {1, 2, 3, 7} <= {n for neurons, _ in ahead for n in neurons.tolist()}
    assert reader.stats.reads == reads + 4  # [1-3], [7]; then [4-5], [9]
    # Untaken: the next read drains it; taking it for another region gives nothing.
    assert reader.prefetch(offset, stride, [0, 1])
    assert torch.equal(reader.read_bundles(offset, stride, [8])[0], want[8])
    assert reader.take_prefetch(offset) == []
    assert reader.prefetch(offset, stride, [0, 1])
    assert reader.take_prefetch(offset + stride) == []
    assert not reader.prefetch(offset, stride, [])
    reader.close()
    plain.close()


def _bundle(i: int, width: int = 4) -> torch.Tensor:
    return torch.full((1, width), float(i)).view(torch.uint8)


def _reader(log: list):
    def read(ids):
        log.append(list(ids))
        return torch.cat([_bundle(i) for i in ids])

    return read


def _check_consistent(window: NeuronWindow) -> None:
    rows = window.neurons()
    assert len(set(rows.tolist())) == rows.numel()
    for row, neuron in enumerate(rows.tolist()):
        assert int(window.neuron_row[neuron]) == row
        assert float(window.buffer[row, 0]) == neuron  # the bundle moved with its neuron
    assert int((window.neuron_row >= 0).sum()) == window.n_used


def test_window_keeps_the_last_k_tokens_neurons():
    log = []
    window = NeuronWindow(
        n_neurons=50, capacity=20, stride_elems=4, dtype=torch.float32, window_tokens=2
    )
    read = _reader(log)
    assert window.load(torch.tensor([1, 2, 3]), 0, read) == 0
    assert window.load(torch.tensor([2, 3, 4]), 1, read) == 2
    assert log[-1] == [4]
    assert window.load(torch.tensor([5]), 2, read) == 0  # 1..4 still within 2 tokens
    assert set(window.neurons().tolist()) == {1, 2, 3, 4, 5}
    # What the next token will still find (the lookahead asks before `evict_stale` runs).
    asked = torch.tensor([1, 4, 5, 9])
    assert window.kept(asked, 2).tolist() == [True, True, True, False]
    assert window.kept(asked, 3).tolist() == [False, True, True, False]  # 1: used at token 0
    assert window.kept(asked, 4).tolist() == [False, False, True, False]  # 4: at token 1
    assert set(window.neurons().tolist()) == {1, 2, 3, 4, 5}  # asking changed nothing
    window.load(torch.tensor([6]), 4, read)  # tokens 0 and 1 are out of the window now
    assert set(window.neurons().tolist()) == {5, 6}
    _check_consistent(window)


def test_window_zero_reads_every_neuron_every_token():
    log = []
    window = NeuronWindow(50, 20, 4, torch.float32, window_tokens=0)
    read = _reader(log)
    for position in range(3):
        assert window.load(torch.tensor([7, 8]), position, read) == 0
    assert log == [[7, 8]] * 3


@pytest.mark.parametrize("capacity", [24, 64])
def test_window_under_random_use_matches_a_set_model(capacity):
    rng = random.Random(1)
    window = NeuronWindow(64, capacity, 4, torch.float32, window_tokens=3)
    read = _reader([])
    last_used: dict[int, int] = {}
    for position in range(200):
        ids = sorted(rng.sample(range(64), rng.randint(0, 12)))
        expect_hits = sum(1 for i in ids if i in last_used and last_used[i] >= position - 3)
        # The model: neurons of the last 3 tokens, minus LRU overflow beyond 24.
        hits = window.load(torch.tensor(ids, dtype=torch.long), position, read)
        present = set(window.neurons().tolist())
        assert set(ids) <= present
        # With room for every neuron the window is exactly "the last 3 tokens' neurons";
        # a smaller one may have dropped some of them (least recently used first).
        assert hits == expect_hits if capacity == 64 else hits <= expect_hits
        for i in ids:
            last_used[i] = position
        for i in list(last_used):
            if i not in present:
                del last_used[i]
        assert all(last_used[i] >= position - 3 for i in present)
        _check_consistent(window)


def test_window_evicts_least_recently_used_when_full():
    window = NeuronWindow(50, 4, 4, torch.float32, window_tokens=10)
    read = _reader([])
    window.load(torch.tensor([1, 2]), 0, read)
    window.load(torch.tensor([3]), 1, read)
    window.load(torch.tensor([4]), 2, read)
    window.load(torch.tensor([5, 6]), 3, read)  # needs 2 rows: 1 and 2 (oldest) go
    assert set(window.neurons().tolist()) == {3, 4, 5, 6}
    _check_consistent(window)
    assert not window.make_room(5, 4)  # cannot take more than its capacity
    with pytest.raises(MemtoolError, match="neurons asked of a window of 4"):
        window.load(torch.arange(5), 5, read)


def test_lowrank_predictor_fits_layernorm_inputs_whose_covariance_is_singular():
    from memtool.serve.flash.sparsity import fit_layer

    generator = torch.Generator().manual_seed(0)
    x = torch.nn.functional.layer_norm(torch.randn(512, 256, generator=generator), (256,))
    weight = torch.randn(1024, 256, generator=generator) * 0.05
    bias = torch.full((1024,), -0.8)
    tensors, facts = fit_layer(x, weight, bias, torch.nn.ReLU(), "relu", "lowrank:64", 0.95)
    assert tensors["a"].shape == (256, 64) and tensors["b"].shape == (64, 1024)
    assert facts["relu"]["recall"] >= 0.94
    # quant:4 approximates the pre-activations themselves: far fewer false positives
    _, exact = fit_layer(x, weight, bias, torch.nn.ReLU(), "relu", "quant:4", 0.95)
    assert exact["relu"]["predicted_fraction"] < facts["relu"]["predicted_fraction"]
    assert exact["relu"]["predicted_fraction"] < 1.3 * exact["relu"]["active_fraction"]


@pytest.mark.parametrize("native", [True, False])
def test_the_measured_gap_is_what_one_read_costs_and_reads_stay_uncounted(store, native):
    if native:
        _native_reader_or_skip()
    reader = NeuronReader(store / FFN_FILE, threads=2, staging_bytes=8192 * 4, native=native)
    layer = open_flash_store(store, verify=False).layers[0]
    measured = reader.measure_gap(layer["stride_bytes"], small_reads=16)
    assert measured["per_read_s"] > 0 and measured["bytes_per_s"] > 0
    expected = min(measured["per_read_s"] * measured["bytes_per_s"], MAX_READ_BYTES // 2)
    assert measured["gap_bytes"] == int(expected)
    assert reader.stats.reads == 0 and reader.stats.bytes_read == 0
    # The reader still reads right afterwards (the staging buffer was only scratch).
    got = reader.read_bundles(layer["offset"], layer["stride_bytes"], [0, 3])
    assert got.shape == (2, layer["stride_bytes"])
    reader.close()
