"""Comparisons: one table of a base and its variants, Pareto frontier, CI gates, summary."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from memtool.cli.app import app
from memtool.comparison import compare, pareto_front
from memtool.compress import BitStackConfig, CalibrationConfig, RTNConfig, compress
from memtool.errors import MemtoolError
from memtool.formats.bitstack_stack import StackFile
from memtool.measurement import MeasureConfig


def test_pareto_front_keeps_only_undominated_points():
    points = [(100, 10.0), (50, 20.0), (60, 25.0), (50, 20.0), (200, 10.0), (30, 90.0)]
    # (60, 25) is beaten by (50, 20); (200, 10) by (100, 10); ties are both kept.
    assert pareto_front(points) == [0, 1, 3, 5]


@pytest.fixture(scope="module")
def variants(tmp_path_factory, tiny_llama_dir, text_file):
    root = tmp_path_factory.mktemp("variants")
    calibration = CalibrationConfig(data=str(text_file), n_samples=4, seq_len=32, batch_size=4)
    compress(tiny_llama_dir, RTNConfig(bits=4, group_size=32), output=root / "rtn")
    stack_config = BitStackConfig(niter=3, score_samples=2)
    compress(tiny_llama_dir, stack_config, calibration, output=root / "stack", show_progress=False)
    return root


def test_compare_measures_every_model_and_budget_against_the_base(
    tiny_llama_dir, variants, text_file, tmp_path
):
    second = tmp_path / "second.txt"
    second.write_text(" ".join(reversed(text_file.read_text().split())))
    stack = StackFile(variants / "stack")
    budgets = [stack.min_bytes, stack.max_bytes]
    config = MeasureConfig(seq_len=32, max_windows=2, show_progress=False)
    data = [str(text_file), str(second)]
    result = compare(
        [str(tiny_llama_dir), str(variants / "rtn"), str(variants / "stack")], data, config, budgets
    )
    labels = [row.label for row in result.rows]
    assert labels[:2] == [str(tiny_llama_dir), str(variants / "rtn")]
    assert [row.budget_bytes for row in result.rows[2:]] == budgets
    base = result.rows[0]
    assert base.perplexity_change_pct == dict.fromkeys(data, 0.0)
    assert result.rows[2].weight_bytes == stack.min_bytes
    for row in result.rows:
        assert row.perplexity_change_pct[data[0]] == pytest.approx(
            100 * (row.perplexity[data[0]] / base.perplexity[data[0]] - 1)
        )
    points = [(r.weight_bytes, r.perplexity[data[0]]) for r in result.rows]
    assert [i for i, r in enumerate(result.rows) if r.pareto] == pareto_front(points)
    assert result.to_markdown().count("\n") == 2 + len(result.rows)


def test_models_with_different_tokenizers_are_not_compared(tiny_llama_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_llama_dir, other)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["zzzqqq"])
    tokenizer.save_pretrained(other)
    with pytest.raises(MemtoolError, match=r"does not share .* tokenizer"):
        compare([str(tiny_llama_dir), str(other)], ["wiki"])


def test_cli_comparison_gates_summary_and_plot(tiny_llama_dir, variants, text_file, tmp_path):
    runner = CliRunner()
    common = ["--data", str(text_file), "--seq-len", "32", "--max-windows", "1"]
    stack = StackFile(variants / "stack")
    summary, plot = tmp_path / "s.md", tmp_path / "p.png"
    args = ["measure", str(tiny_llama_dir), str(variants / "rtn"), str(variants / "stack")]
    args += [*common, "--budgets", f"{stack.min_bytes},{stack.max_bytes}"]
    result = runner.invoke(app, [*args, "--summary", str(summary), "--plot", str(plot), "--json"])
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert len(payload["rows"]) == 4 and payload["thresholds"]["passed"]
    assert summary.read_text().startswith("# memtool measure: comparison")
    assert plot.read_bytes()[:4] == b"\x89PNG"
    # The gate trips just below the worst variant's change and passes just above it.
    worst = max(row["perplexity_change_pct"][str(text_file)] for row in payload["rows"][1:])
    below = runner.invoke(app, [*args, "--max-perplexity-increase", f"{worst - 0.05:.2f}"])
    assert below.exit_code == 1
    assert "above --max-perplexity-increase" in below.stderr
    above = runner.invoke(app, [*args, "--max-perplexity-increase", f"{worst + 0.05:.2f}"])
    assert above.exit_code == 0, above.stderr
    # The size gate is the variants': the larger base passes it, a variant above it does not.
    largest = max(row["weight_bytes"] for row in payload["rows"][1:])
    assert largest < payload["rows"][0]["weight_bytes"]
    fits = runner.invoke(app, [*args, "--max-weight-bytes", str(largest)])
    assert fits.exit_code == 0, fits.stderr
    over = runner.invoke(app, [*args, "--max-weight-bytes", str(largest - 1)])
    assert over.exit_code == 1 and "exceed --max-weight-bytes" in over.stderr
    for bad, match in (
        (["measure", str(tiny_llama_dir), *common, "--summary", str(summary)], "--summary applies"),
        (["measure", str(tiny_llama_dir), "--data", "wiki", "--data", "code"], "several --data"),
        ([*args, "--summary", str(tmp_path / "s.txt")], "give a .md file name"),
    ):
        failed = runner.invoke(app, bad)
        assert failed.exit_code == 2 and match in failed.stderr, failed.stderr
