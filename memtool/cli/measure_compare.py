"""`memtool measure BASE VARIANT ...`: the comparison table, its gates, summary and plot."""

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from memtool.atomic import atomic_file
from memtool.comparison import Comparison, compare, density_cells, task_cells, task_metric
from memtool.errors import MemtoolError
from memtool.measurement import MeasureConfig
from memtool.sizes import format_size


@dataclass(frozen=True)
class Gates:
    """CI thresholds; None disables one."""

    max_perplexity: float | None
    max_weight_bytes: int | None
    max_perplexity_increase_pct: float | None
    min_density: float | None = None


def run_comparison(
    models: list[str],
    data: list[str],
    config: MeasureConfig,
    budgets: list[int] | None,
    gates: Gates,
    plot: str | None,
    summary: str | None,
) -> tuple[dict, list[str]]:
    """Measure, then write the optional summary and plot; returns (payload, failed gates)."""
    for path, suffix in ((plot, ".png"), (summary, ".md")):
        if path is not None and Path(path).suffix.lower() != suffix:
            raise MemtoolError(f"{path}: give a {suffix} file name")
    comparison = compare(models, data, config, budgets)
    payload = comparison.to_dict()
    if summary is not None:
        with atomic_file(Path(summary)) as tmp:
            tmp.write_text(_summary(comparison))
        payload["summary"] = summary
    if plot is not None:
        payload["plot"] = _plot(comparison, plot)
    return payload, failures(comparison, gates)


def failures(comparison: Comparison, gates: Gates) -> list[str]:
    """One sentence per breached gate and row."""
    found = []
    base = comparison.rows[0]
    for row in comparison.rows:
        for spec in comparison.data:
            ppl = row.perplexity[spec]
            if gates.max_perplexity is not None and ppl > gates.max_perplexity:
                found.append(
                    f"{row.label}: perplexity {ppl:.4g} on {spec} exceeds --max-perplexity "
                    f"{gates.max_perplexity:g}"
                )
            change = row.perplexity_change_pct[spec]
            limit = gates.max_perplexity_increase_pct
            if row is not base and limit is not None and change > limit:
                found.append(
                    f"{row.label}: perplexity on {spec} is {change:+.1f}% vs the base, above "
                    f"--max-perplexity-increase {limit:g}%"
                )
        density = row.capacity_density
        if gates.min_density is not None and density is not None and density < gates.min_density:
            found.append(
                f"{row.label}: capacity density {row.effective_params_bound or ''}{density:.4g} "
                f"is below --min-density {gates.min_density:g}"
            )
        # The base is the reference, usually the uncompressed model: the size gate is the
        # variants' (its perplexity and density gates do apply to it).
        too_big = gates.max_weight_bytes is not None and row.weight_bytes > gates.max_weight_bytes
        if row is not base and too_big:
            found.append(
                f"{row.label}: weight bytes {row.weight_bytes} exceed --max-weight-bytes "
                f"{gates.max_weight_bytes}"
            )
    return found


def _summary(comparison: Comparison) -> str:
    first = comparison.reports[0]
    return (
        "# memtool measure: comparison\n\n"
        f"Base: `{comparison.rows[0].label}`. Data: {', '.join(comparison.data)} "
        f"({first['windows']} windows x {first['seq_len']} tokens each). Pareto: no other row "
        f"is smaller and at least as good on {comparison.data[0]}, or better and no larger.\n\n"
        + comparison.to_markdown()
    )


def _plot(comparison: Comparison, path: str) -> str:
    from memtool.plots import plot_perplexity_vs_bytes

    spec = comparison.data[0]
    series: dict[str, list[tuple[int, float]]] = {}
    for row in comparison.rows:  # a stack's budgets form one curve
        series.setdefault(row.model, []).append((row.weight_bytes, row.perplexity[spec]))
    frontier = [(r.weight_bytes, r.perplexity[spec]) for r in comparison.rows if r.pareto]
    title = f"perplexity on {spec} against weight bytes"
    return str(plot_perplexity_vs_bytes(series, path, title, frontier=frontier))


def render_comparison(payload: dict) -> None:
    data = payload["data"]
    table = Table(title=f"memtool measure: {len(payload['rows'])} models, base first")
    columns = ["model", "weight bytes", "bits/w (linear)", "tokens/s"]
    columns += [f"ppl {d}" for d in data] + [f"Δ {d}" for d in data] + ["bytes", "Pareto"]
    has_density = payload["rows"][0]["effective_params"] is not None
    if has_density:
        columns += ["N̂", "density (90%)", "N̂ vs base"]
    first_scores = payload["rows"][0]["task_scores"] or {}
    tasks = list(first_scores)
    columns += [f"{task} {task_metric(first_scores[task])}" for task in tasks]
    for column in columns:
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in payload["rows"]:
        cells = [
            row["label"],
            format_size(row["weight_bytes"]),
            f"{row['bits_per_weight_linear']:.2f}",
            f"{row['tokens_per_s']:.1f}",
        ]
        cells += [f"{row['perplexity'][d]:.3f}" for d in data]
        cells += [f"{row['perplexity_change_pct'][d]:+.1f}%" for d in data]
        cells += [f"{row['weight_bytes_ratio']:.2f}x", "*" if row["pareto"] else ""]
        if has_density:
            cells += density_cells(row)
        cells += task_cells(row, tasks)
        table.add_row(*cells)
    console = Console()
    console.print(table)
    first = payload["reports"][0]
    console.print(
        f"[dim]{first['windows']} windows x {first['seq_len']} tokens per data set; "
        f"* = on the Pareto frontier of bytes vs perplexity on {data[0]}[/]"
    )
    if has_density:
        console.print(
            f"[dim]N̂: effective parameters on {data[0]} against {first['density_profile']}; "
            "N̂ vs base = N̂ / the base's; < or > marks a bound[/]"
        )
        for row in payload["rows"]:
            if row["density_flags"]:
                console.print(f"[dim]{row['label']}: {', '.join(row['density_flags'])}[/]")
    for key in ("summary", "plot"):
        if key in payload:
            console.print(f"{key}: {payload[key]}")
