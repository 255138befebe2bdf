"""BitStack mechanics: decomposition, rank choice, exact scale folding, stack ordering."""

import json

import pytest
import torch

from memtool import load_model
from memtool.compress import BitStackConfig, CalibrationConfig, compress
from memtool.compress.bitstack import (
    auto_rank,
    block_bits_per_weight,
    decompose,
    feedback_signs,
)
from memtool.compress.bitstack_order import LinearBlocks, order_stack
from memtool.compress.bitstack_scaling import (
    body_linears,
    collect_stats,
    fold_scales,
)
from memtool.compress.hessian import inverse_hessian_factor
from memtool.data import calibration_windows
from memtool.errors import MemtoolError
from memtool.formats.bitstack_pack import pack_signs
from memtool.ops.reference import bitstack_reconstruct


def _calib(text_file, n=8, seq_len=32):
    return CalibrationConfig(data=str(text_file), n_samples=n, seq_len=seq_len, batch_size=4)


def _stacked(blocks):
    return (
        torch.stack([b.signs for b in blocks]),
        torch.stack([b.u for b in blocks]),
        torch.stack([b.v for b in blocks]),
    )


def test_blocks_sum_to_weight_minus_residual_and_error_falls():
    torch.manual_seed(0)
    weight = torch.randn(48, 40) * 0.05
    seen = []

    def error(residual):
        seen.append(residual.clone())
        return float(residual.pow(2).sum())

    blocks, errors = decompose(weight, niter=6, rank=3, error=error)
    assert len(blocks) == 6 and len(errors) == 7
    assert errors == sorted(errors, reverse=True)  # every block helps
    assert errors[-1] < 0.25 * errors[0]
    # What the stack stores adds up to exactly the weight minus the residual it reports.
    torch.testing.assert_close(
        bitstack_reconstruct(*_stacked(blocks), 40), weight - seen[-1], rtol=0, atol=1e-6
    )
    # Each block's signs are the signs of the residual it was fitted to (zeros as +1).
    assert torch.equal(blocks[1].signs, pack_signs(seen[1]))
    assert blocks[0].u.dtype == torch.float16 and blocks[0].nbytes == 48 * 5 + 2 * 3 * (48 + 40)


def test_fp16_residual_tracks_the_stored_factors_better_than_fp32():
    # The residual that subtracts the rounded factors lets later blocks fix the rounding;
    # measured against what is actually stored, it never does worse.
    torch.manual_seed(1)
    weight = torch.randn(64, 64) * 0.02
    errs = {}
    for residual in ("fp16", "fp32"):
        torch.manual_seed(2)
        blocks, _ = decompose(weight, niter=8, rank=4, residual=residual, exact_svd=True)
        approx = bitstack_reconstruct(*_stacked(blocks), 64)
        errs[residual] = float((weight - approx).norm())
    assert errs["fp16"] <= errs["fp32"] * 1.0001


def test_row_weights_fit_the_weighted_rows_better_and_store_plain_factors():
    torch.manual_seed(5)
    weight = torch.randn(40, 48) * 0.05
    rows = torch.rand(40).pow(3) * 20 + 0.05  # a few rows count far more than the rest
    seen = []

    def error(residual):
        seen.append(residual.clone())
        return float(residual.pow(2).sum())

    weighted = {}
    for name, row_weight in (("plain", None), ("weighted", rows)):
        blocks, _ = decompose(weight, 2, 3, exact_svd=True, error=error, row_weight=row_weight)
        approx = bitstack_reconstruct(*_stacked(blocks), 48)
        # The stored blocks are in the weight's own space: they add up to the weight minus
        # the residual the error function was shown.
        torch.testing.assert_close(approx, weight - seen[-1], rtol=0, atol=1e-6)
        one = bitstack_reconstruct(*_stacked(blocks[:1]), 48)
        weighted[name] = float(((weight - one) * rows.view(-1, 1)).square().sum())
    # One block keeps sign(W) either way, so its error is the magnitude fit's: the weighted
    # fit is the best rank-3 fit under the row weights.
    assert weighted["weighted"] < 0.9 * weighted["plain"]


def test_randomized_svd_is_as_good_as_exact():
    torch.manual_seed(3)
    weight = torch.randn(96, 80) * 0.05
    norms = {}
    for exact in (True, False):
        torch.manual_seed(4)
        blocks, _ = decompose(weight, niter=4, rank=3, exact_svd=exact)
        norms[exact] = float((weight - bitstack_reconstruct(*_stacked(blocks), 80)).norm())
    assert norms[False] <= norms[True] * 1.02


def test_auto_rank_gives_blocks_of_about_the_target_bits():
    # smollm2-135m's shapes: q/o, k/v, gate/up/down.
    assert auto_rank(576, 576, 1.25) == 4
    assert auto_rank(192, 576, 1.25) == 2
    assert auto_rank(1536, 576, 1.25) == 7
    assert auto_rank(4096, 4096, 1.25) == 32
    for m, n in ((576, 576), (192, 576), (1536, 576), (576, 1536)):
        assert 1.1 <= block_bits_per_weight(m, n, auto_rank(m, n, 1.25)) <= 1.3
    assert auto_rank(8, 8, 1.25) == 1  # never zero


def test_uniform_order_goes_level_by_level():
    linears = [LinearBlocks(10, (9, 5, 3, 2)), LinearBlocks(20, (9, 8, 1, 0))]
    stack = order_stack(linears, "uniform")
    assert stack == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]


def test_importance_order_keeps_each_linear_in_order_and_follows_gain_per_byte():
    # Linear 1's next block gains little but the one after gains a lot: the envelope lets it
    # compete with its average and come before linear 0's mediocre blocks.
    linears = [
        LinearBlocks(10, (100, 50, 40, 31, 25)),
        LinearBlocks(10, (100, 60, 59, 5, 4)),
        LinearBlocks(1000, (100, 90, 80, 70, 60)),  # costly for its gains: last
    ]
    stack = order_stack(linears, "importance")
    assert stack[:3] == [(0, 0), (1, 0), (2, 0)]
    rest = stack[3:]
    assert rest[:2] == [(1, 1), (1, 2)]
    for index in range(3):
        levels = [level for linear, level in rest if linear == index]
        assert levels == sorted(levels) == list(range(1, 4))
    assert [linear for linear, _ in rest[-3:]] == [2, 2, 2]
    with pytest.raises(MemtoolError, match="unknown stack order"):
        order_stack(linears, "random")


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("heads", [(4, 2), (4, 4)])  # grouped-query and plain attention
def test_folding_scales_keeps_the_function(tiny_llama_dir, text_file, heads):
    from transformers import LlamaForCausalLM

    loaded = load_model(tiny_llama_dir)
    config = loaded.model.config
    config.num_attention_heads, config.num_key_value_heads = heads
    torch.manual_seed(5)
    model = LlamaForCausalLM(config).eval()
    windows = calibration_windows(str(text_file), loaded.tokenizer, n_samples=4, seq_len=32)
    ids = windows.input_ids[:2]
    before = _logits(model, ids)
    stats, fisher = collect_stats(model, windows.input_ids, 2, 2, show_progress=False)
    assert set(fisher) == set(body_linears(model))
    # Linears reading one tensor share statistics; different outputs keep their own Fisher.
    assert stats["model.layers.0.self_attn.q_proj"] is stats["model.layers.0.self_attn.k_proj"]
    assert fisher["model.layers.0.self_attn.q_proj"].shape == (config.hidden_size,)
    scalings, warnings = fold_scales(model, stats)
    # The folded model computes the same function with every linear's columns scaled.
    torch.testing.assert_close(_logits_with_scales(model, scalings, ids), before)
    explicit = {n for n, s in scalings.items() if s.explicit}
    if heads[0] == heads[1]:
        assert explicit == set()
    else:  # v is narrower than o's input: o keeps its scale
        assert explicit == {f"model.layers.{i}.self_attn.o_proj" for i in range(2)}
    assert scalings["model.layers.0.mlp.up_proj"].row_divisor is not None
    assert warnings == []


def _logits_with_scales(model, scalings, ids):
    """Run `model` with explicit scales applied to their linears' inputs, as loading does."""
    linears = body_linears(model)
    handles = [
        linears[name].register_forward_pre_hook(
            lambda module, args, s=scaling.scale: (args[0] / s,)
        )
        for name, scaling in scalings.items()
        if scaling.explicit
    ]
    try:
        return _logits(model, ids)
    finally:
        for handle in handles:
            handle.remove()


def test_unknown_architecture_keeps_explicit_scales_with_a_warning(tiny_llama_dir, text_file):
    loaded = load_model(tiny_llama_dir)
    model = loaded.model
    windows = calibration_windows(str(text_file), loaded.tokenizer, n_samples=4, seq_len=32)
    ids = windows.input_ids[:2]
    before = _logits(model, ids)
    stats, _ = collect_stats(model, windows.input_ids, 2, 0, show_progress=False)
    model.config.model_type = "strange"
    scalings, warnings = fold_scales(model, stats)
    assert len(warnings) == 1 and "'strange'" in warnings[0]
    assert all(s.explicit for s in scalings.values())
    torch.testing.assert_close(_logits_with_scales(model, scalings, ids), before)


def test_compress_refuses_a_rank_too_large_before_any_work(tiny_llama_dir, text_file, tmp_path):
    out = tmp_path / "stack"
    with pytest.raises(MemtoolError, match=r"--rank 500 does not fit .*q_proj \(64x64\)"):
        compress(tiny_llama_dir, BitStackConfig(rank=500), _calib(text_file), output=out)
    assert not out.exists()


def test_compress_refuses_more_score_windows_than_calibration(tiny_llama_dir, text_file, tmp_path):
    config = BitStackConfig(niter=2, score_samples=20)
    with pytest.raises(MemtoolError, match="--score-samples 20 is more than the 8"):
        compress(tiny_llama_dir, config, _calib(text_file), output=tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_compress_needs_an_output(tiny_llama_dir, text_file):
    with pytest.raises(MemtoolError, match="pass --output"):
        compress(tiny_llama_dir, BitStackConfig(niter=2), _calib(text_file))


def test_loss_estimate_is_the_fisher_weighted_error_in_the_original_weight_space():
    from memtool.compress.bitstack_scaling import LinearStats, Scaling, loss_estimator

    torch.manual_seed(6)
    x = torch.randn(100, 12)
    stats = LinearStats(torch.ones(12))
    stats.add_hessian(x[:60])
    stats.add_hessian(x[60:])
    torch.testing.assert_close(stats.hessian, x.T @ x / 100)
    s, r, f = torch.rand(12) + 0.5, torch.rand(8) + 0.5, torch.rand(8)
    scaled_error = torch.randn(8, 12)
    error = r.view(-1, 1) * scaled_error / s.view(1, -1)  # back in the original space
    expected = float((f * ((error @ stats.hessian) * error).sum(dim=1)).sum())
    estimate = loss_estimator(stats, f, Scaling(s, explicit=False, row_divisor=r))
    assert estimate(scaled_error) == pytest.approx(expected, rel=1e-5)
    # Without statistics: the scaled residual's energy.
    bare = loss_estimator(LinearStats(torch.ones(12)), None, Scaling(s, explicit=False))
    assert bare(scaled_error) == pytest.approx(float(scaled_error.pow(2).sum()), rel=1e-6)


def test_interrupting_a_compression_leaves_no_output(
    tiny_llama_dir, text_file, tmp_path, monkeypatch
):
    import memtool.compress.bitstack_pipeline as pipeline
    from memtool.formats import bitstack_stack

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    # Once mid-decomposition, once while the files are being written.
    for module, name in ((pipeline, "decompose"), (bitstack_stack, "save_file")):
        with monkeypatch.context() as patch:
            patch.setattr(module, name, interrupted)
            with pytest.raises(KeyboardInterrupt):
                compress(
                    tiny_llama_dir,
                    BitStackConfig(niter=2),
                    _calib(text_file),
                    output=tmp_path / "stack",
                    show_progress=False,
                )
        assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("scored", [0, 3])
def test_scale_is_the_mean_window_l2_norm_over_every_window(tiny_llama_dir, text_file, scored):
    loaded = load_model(tiny_llama_dir)
    model = loaded.model
    windows = calibration_windows(str(text_file), loaded.tokenizer, n_samples=6, seq_len=32)
    seen = []
    handle = model.get_submodule("model.layers.1.mlp.down_proj").register_forward_hook(
        lambda module, args, out: seen.append(args[0].detach()[0])
    )
    with torch.no_grad():
        for row in windows.input_ids:
            model(input_ids=row[None])
    handle.remove()
    expected = torch.stack([x.pow(2).sum(dim=0).sqrt() for x in seen]).mean(dim=0)
    stats, fisher = collect_stats(model, windows.input_ids, 4, scored, show_progress=False)
    entry = stats["model.layers.1.mlp.down_proj"]
    assert entry.windows == 6
    torch.testing.assert_close(entry.scale, expected, rtol=1e-4, atol=1e-6)
    assert (entry.hessian is None) == (scored == 0) and len(fisher) == (14 if scored else 0)
    if scored:  # the Hessian comes from the scored windows only
        tokens = torch.cat(seen[:scored])
        torch.testing.assert_close(
            entry.hessian, tokens.T @ tokens / len(tokens), rtol=1e-4, atol=1e-6
        )


def test_score_windows_of_their_own_data_give_hessians_and_fisher_but_no_scales(
    tiny_llama_dir, text_file, held_out_text_file
):
    loaded = load_model(tiny_llama_dir)
    model, tokenizer = loaded.model, loaded.tokenizer
    windows = calibration_windows(str(text_file), tokenizer, n_samples=4, seq_len=32)
    score = calibration_windows(str(held_out_text_file), tokenizer, n_samples=3, seq_len=32)
    stats, fisher = collect_stats(
        model, windows.input_ids, 4, 3, show_progress=False, score_windows=score.input_ids
    )
    scales_only, _ = collect_stats(model, windows.input_ids, 4, 0, show_progress=False)
    scored, scored_fisher = collect_stats(model, score.input_ids, 4, 3, show_progress=False)
    for name, entry in stats.items():
        assert entry.windows == 4
        torch.testing.assert_close(entry.scale, scales_only[name].scale)
        torch.testing.assert_close(entry.hessian, scored[name].hessian)
        torch.testing.assert_close(fisher[name], scored_fisher[name])


def test_compress_with_score_data_records_both_window_sets(
    tiny_llama_dir, text_file, held_out_text_file, tmp_path
):
    config = BitStackConfig(niter=2, score_data=str(held_out_text_file))
    result, _, _ = compress(
        tiny_llama_dir, config, _calib(text_file, n=2, seq_len=16), output=tmp_path / "s"
    )
    meta = json.loads((tmp_path / "s" / "bitstack.json").read_text())
    # The default 16 score windows, not capped at the 2 calibration windows.
    assert meta["settings"]["score_samples"] == 16
    assert meta["score_calibration"]["n_windows"] == 16
    assert meta["score_calibration"]["data"] == f"text:{held_out_text_file}"
    assert result.details["score_calibration"] == meta["score_calibration"]
    assert meta["calibration"]["n_windows"] == 2
    plain = tmp_path / "plain"
    compress(
        tiny_llama_dir, BitStackConfig(niter=2), _calib(text_file, n=2, seq_len=16), output=plain
    )
    assert json.loads((plain / "bitstack.json").read_text())["score_calibration"] is None


def test_score_data_without_score_windows_is_refused():
    with pytest.raises(MemtoolError, match="--score-calib needs score windows"):
        BitStackConfig(score_data="wiki", score_samples=0, feedback=False).validate()


def test_a_bad_score_data_spec_is_refused_before_any_work():
    with pytest.raises(MemtoolError, match="no such file or directory: /no/such/text"):
        BitStackConfig(score_data="/no/such/text").validate()


def test_bfloat16_statistics_run_the_matmuls_in_bfloat16_and_stay_close(tiny_llama_dir, text_file):
    loaded = load_model(tiny_llama_dir)
    model = loaded.model
    windows = calibration_windows(str(text_file), loaded.tokenizer, n_samples=6, seq_len=32)
    seen = []
    handle = model.get_submodule("model.layers.1.mlp.down_proj").register_forward_hook(
        lambda module, args, out: seen.append(out.dtype)
    )
    exact, exact_fisher = collect_stats(model, windows.input_ids, 4, 2, show_progress=False)
    assert set(seen) == {torch.float32}
    seen.clear()
    half, half_fisher = collect_stats(
        model, windows.input_ids, 4, 2, show_progress=False, compute_dtype=torch.bfloat16
    )
    handle.remove()
    assert set(seen) == {torch.bfloat16}  # the scored windows and the scale pass alike
    drifts = []
    for name, entry in exact.items():
        assert half[name].scale.dtype == torch.float32 and half[name].windows == entry.windows
        torch.testing.assert_close(half[name].scale, entry.scale, rtol=0.03, atol=1e-4)
        drifts.append((half[name].hessian - entry.hessian).norm() / entry.hessian.norm())
    # Inputs after a bfloat16 matmul moved, a little (layer 0's norm output did not).
    assert 0 < max(drifts) < 0.02
    for name, values in exact_fisher.items():
        drift = (half_fisher[name] - values).norm() / values.norm()
        assert half_fisher[name].dtype == torch.float32 and drift < 0.1


def test_the_stack_records_the_statistics_dtype_it_used(tiny_llama_dir, text_file, tmp_path):
    config = BitStackConfig(niter=2, score_samples=2, stats_dtype="bfloat16")
    result, _, _ = compress(tiny_llama_dir, config, _calib(text_file), output=tmp_path / "s")
    assert result.details["statistics_dtype"] == "bfloat16"
    meta = json.loads((tmp_path / "s" / "bitstack.json").read_text())
    assert meta["statistics_dtype"] == "bfloat16"
    assert meta["settings"]["stats_dtype"] == "bfloat16"


def _output_error(weight, blocks, hessian, k):
    stored = bitstack_reconstruct(*_stacked(blocks[:k]), weight.shape[1])
    error = weight - stored
    return float(((error @ hessian) * error).sum())


def test_feedback_with_a_diagonal_hessian_keeps_the_residual_signs():
    torch.manual_seed(0)
    rest, magnitude = torch.randn(12, 20), torch.rand(12, 20)
    hinv_upper = torch.diag(torch.rand(20) + 0.5)  # uncorrelated inputs: nothing to feed back
    assert torch.equal(
        feedback_signs(rest, magnitude, hinv_upper), torch.where(rest < 0, -1.0, 1.0)
    )


def test_feedback_blocks_leave_less_output_error_on_the_calibration_inputs():
    torch.manual_seed(0)
    weight = torch.randn(48, 64) * 0.05
    mixing = torch.randn(64, 64) / 8 + torch.eye(64)  # correlated, unevenly scaled inputs
    inputs = torch.randn(512, 64) @ mixing * torch.linspace(0.2, 3, 64)
    hessian = inputs.T @ inputs / 512
    hinv_upper, _ = inverse_hessian_factor(hessian, 0.01, 1.0)
    plain, _ = decompose(weight, niter=8, rank=3)
    fed, _ = decompose(weight, niter=8, rank=3, hinv_upper=hinv_upper)
    for k in (1, 8):
        assert _output_error(weight, fed, hessian, k) < 0.9 * _output_error(
            weight, plain, hessian, k
        )
    # The stored blocks still add up to what the signs and factors say (no hidden state).
    assert all(b.signs.shape == (48, 8) for b in fed)


def test_feedback_needs_score_windows():
    with pytest.raises(MemtoolError, match="--feedback needs the input Hessians"):
        BitStackConfig(feedback=True, score_samples=0).validate()


def test_feedback_stacks_record_it_and_cut_the_estimated_loss(tiny_llama_dir, text_file, tmp_path):
    totals = {}
    for feedback in (False, True):
        config = BitStackConfig(niter=3, score_samples=4, feedback=feedback, damp_percent=0.1)
        torch.manual_seed(0)
        compress(tiny_llama_dir, config, _calib(text_file), output=tmp_path / str(feedback))
        meta = json.loads((tmp_path / str(feedback) / "bitstack.json").read_text())
        assert meta["settings"]["feedback"] is feedback
        totals[feedback] = sum(errors[-1] for errors in meta["estimated_loss_increase"])
        loaded = load_model(tmp_path / str(feedback))
        logits = loaded.model(torch.tensor([[1, 2, 3, 4]])).logits
        assert torch.isfinite(logits).all()
    assert totals[True] < totals[False]


@pytest.mark.parametrize("power", [0.0, 0.5])
def test_output_weighting_weights_each_row_by_its_share_of_the_estimate(
    tiny_llama_dir, text_file, tmp_path, monkeypatch, power
):
    import memtool.compress.bitstack_pipeline as pipeline

    seen, real_collect, real_fold, real_decompose = (
        {},
        pipeline.collect_stats,
        pipeline.fold_scales,
        pipeline.decompose,
    )

    def collect(*args, **kwargs):
        seen["stats"], seen["fisher"] = real_collect(*args, **kwargs)
        return seen["stats"], seen["fisher"]

    def fold(*args, **kwargs):
        seen["scalings"], warnings = real_fold(*args, **kwargs)
        return seen["scalings"], warnings

    def decompose(weight, *args, row_weight=None, **kwargs):
        seen.setdefault("rows", []).append(row_weight)
        return real_decompose(weight, *args, row_weight=row_weight, **kwargs)

    monkeypatch.setattr(pipeline, "collect_stats", collect)
    monkeypatch.setattr(pipeline, "fold_scales", fold)
    monkeypatch.setattr(pipeline, "decompose", decompose)
    config = BitStackConfig(niter=2, score_samples=4, output_weighting=power)
    compress(tiny_llama_dir, config, _calib(text_file), output=tmp_path / "s")
    if power == 0:
        assert all(rows is None for rows in seen["rows"])
        return
    names = list(seen["stats"])  # the forward order, which the decomposition follows
    divided = 0
    for name, rows in zip(names, seen["rows"], strict=True):
        share = seen["fisher"][name]
        divisor = seen["scalings"][name].row_divisor
        if divisor is not None:  # up_proj: its rows feed down_proj's folded scale
            share = share * divisor.pow(2)
            divided += 1
        expected = share.pow(power / 2)
        torch.testing.assert_close(rows, (expected / expected.mean()).clamp_min(1e-2))
    assert divided > 0
    meta = json.loads((tmp_path / "s" / "bitstack.json").read_text())
    assert meta["settings"]["output_weighting"] == power


def test_row_weights_survive_large_powers_and_rows_without_gradient():
    from memtool.compress.bitstack_pipeline import _row_weight
    from memtool.compress.bitstack_scaling import Scaling

    scaling = Scaling(torch.ones(4), explicit=False)
    fisher = torch.tensor([1e-12, 1.0, 4.0, 0.0])
    # Power 300: sqrt(4) ** 300 overflows float32; the weights span 10**1890, past float64.
    weight = _row_weight(fisher, scaling, 300.0)
    assert torch.isfinite(weight).all()
    torch.testing.assert_close(weight, torch.tensor([1e-2, 1e-2, 4.0, 1e-2]))
    # Power 1: sqrt(f) over its mean; the row without gradient floored at 1% of the mean.
    expected = torch.tensor([1e-6, 1.0, 2.0, 0.0]) / (3.000001 / 4)
    torch.testing.assert_close(_row_weight(fisher, scaling, 1.0), expected.clamp_min(1e-2))
    assert _row_weight(torch.zeros(4), scaling, 1.0) is None  # no gradient reached the layer
    assert _row_weight(fisher, scaling, 0.0) is None


def test_default_score_windows_are_capped_at_the_calibration_windows(
    tiny_llama_dir, text_file, tmp_path
):
    compress(tiny_llama_dir, BitStackConfig(niter=2), _calib(text_file), output=tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "bitstack.json").read_text())
    assert meta["settings"]["score_samples"] == 8  # the default 16, capped at the 8 windows
    assert meta["settings"]["feedback"] is True


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("loop", ["python", "cpu"])
def test_feedback_row_errors_give_the_direct_loss_estimate(loop, weighted, monkeypatch):
    """The estimate after each feedback block, from the loop's own per-column errors, equals
    the one the Hessian product gives (dead input columns and row divisors included)."""
    import memtool.compress.bitstack as bitstack
    from memtool.compress.bitstack_scaling import (
        LinearStats,
        Scaling,
        feedback_factor,
        loss_estimator,
    )

    if loop == "cpu" and not bitstack.cpu_kernel_status()[0]:
        pytest.skip("native CPU kernels do not build here")
    real = bitstack.feedback_signs
    monkeypatch.setattr(bitstack, "feedback_signs", lambda *a, **k: real(*a, **k, loop=loop))
    torch.manual_seed(3)
    inputs = torch.randn(300, 40) @ (torch.randn(40, 40) / 6 + torch.eye(40))
    inputs[:, 7] = 0  # never active: a dead column, which the feedback treats apart
    stats = LinearStats(torch.ones(40))
    stats.add_hessian(inputs)
    scaling = Scaling(torch.rand(40) + 0.5, explicit=False, row_divisor=torch.rand(24) + 0.5)
    factor = feedback_factor(stats, scaling, 0.3)
    estimate = loss_estimator(stats, torch.rand(24), scaling, factor.diag_shift)
    weight = torch.randn(24, 40)
    rows = torch.rand(24) * 3 + 0.1 if weighted else None
    torch.manual_seed(0)
    _, from_rows = decompose(weight, 6, 3, error=estimate, hinv_upper=factor.upper, row_weight=rows)
    torch.manual_seed(0)
    direct_only = lambda residual, rows=None: estimate(residual)  # noqa: E731
    _, direct = decompose(weight, 6, 3, error=direct_only, hinv_upper=factor.upper, row_weight=rows)
    assert from_rows == pytest.approx(direct, rel=1e-4)
    assert from_rows[-1] < 0.5 * from_rows[0]  # the blocks do cut the error


def test_token_weighted_statistics_match_each_linears_own_gradients(tiny_llama_dir, text_file):
    """Per linear, Σ_t w_t x_t² and Σ_t w_t with w_t its output gradient's squared norm at
    token t, over the score windows, and the correlation factor built from them."""
    from memtool.compress.bitstack_scaling import Scaling, token_correlation

    loaded = load_model(tiny_llama_dir)
    model = loaded.model
    windows = calibration_windows(str(text_file), loaded.tokenizer, n_samples=5, seq_len=32)
    linears = body_linears(model)
    seen = {name: [] for name in linears}

    def record(name):
        def hook(module, args, output):
            output.register_hook(lambda grad: seen[name].append((args[0].detach(), grad)))

        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in linears.items()]
    for row in windows.input_ids[:3]:  # the score windows, back-propagated one at a time
        model(input_ids=row[None], labels=row[None]).loss.backward()
    for handle in handles:
        handle.remove()
    model.zero_grad()
    plain, _ = collect_stats(model, windows.input_ids, 4, 3, show_progress=False)
    assert all(entry.token_weighted == {} for entry in plain.values())  # only when asked
    stats, _ = collect_stats(
        model, windows.input_ids, 4, 3, show_progress=False, token_weights=True
    )
    factors = []
    for name, pairs in seen.items():
        x = torch.cat([inputs.reshape(-1, inputs.shape[-1]) for inputs, _ in pairs])
        g = torch.cat([grad.reshape(-1, grad.shape[-1]) for _, grad in pairs])
        w = g.pow(2).sum(dim=1)
        sums, total = stats[name].token_weighted[name]
        torch.testing.assert_close(sums, w @ x.pow(2), rtol=1e-4, atol=1e-12)
        assert total == pytest.approx(float(w.sum()), rel=1e-5)
        s = torch.rand(x.shape[1]) + 0.5
        scaled = x / s
        expected = float((w * scaled.pow(2).sum(dim=1)).sum() / w.sum())
        expected /= float(scaled.pow(2).sum(dim=1).mean())
        factor = token_correlation(stats[name], name, Scaling(s, explicit=False))
        assert factor == pytest.approx(expected, rel=1e-4)
        factors.append(factor)
    # Gradients and inputs do correlate across tokens here (K-FAC's factor would be 1).
    assert max(abs(f - 1) for f in factors) > 0.05, factors


def test_token_weighting_rescales_each_linears_estimates_and_keeps_its_blocks(
    tiny_llama_dir, text_file, tmp_path
):
    metas = {}
    for weighting in (False, True):
        config = BitStackConfig(niter=3, score_samples=4, token_weighting=weighting)
        out = tmp_path / str(weighting)
        compress(tiny_llama_dir, config, _calib(text_file), output=out, show_progress=False)
        metas[weighting] = json.loads((out / "bitstack.json").read_text())
        blocks = load_model(out).bitstack.modules
        metas[weighting]["signs"] = [m.signs.clone() for m in blocks]
    assert metas[True]["settings"]["token_weighting"] is True
    ratios = []
    for plain, weighted in zip(
        metas[False]["estimated_loss_increase"], metas[True]["estimated_loss_increase"], strict=True
    ):
        ratio = weighted[0] / plain[0]
        assert [w / p for w, p in zip(weighted, plain, strict=True)] == pytest.approx(
            [ratio] * 4, rel=1e-6
        )
        ratios.append(ratio)
    assert max(abs(r - 1) for r in ratios) > 0.05
    for plain, weighted in zip(metas[False]["signs"], metas[True]["signs"], strict=True):
        assert torch.equal(plain, weighted)  # the same blocks, in another stack order
