"""`memtool measure`: perplexity, size and speed of a model, with CI gates."""

import json

import typer
from rich.console import Console
from rich.table import Table

from memtool.cli.common import DebugOption, JsonOption, run_command
from memtool.cli.measure_compare import Gates, render_comparison, run_comparison
from memtool.errors import MemtoolError
from memtool.measurement import (
    DEFAULT_MAX_WINDOWS,
    MeasureConfig,
    measure,
    measure_budgets,
    threshold_failures,
)
from memtool.sizes import format_size, parse_size


def measure_command(
    models: list[str] = typer.Argument(
        None,
        help="Built-in name, model folder, .gguf file or hub id (default: smollm2-135m). "
        "Several: compare them, the first being the base.",
    ),
    data: list[str] = typer.Option(
        None,
        "--data",
        help="Evaluation data (default wiki): wiki, code, mixed, a .txt/.jsonl file "
        "(FILE.jsonl:FIELD), a folder (DIR:GLOB), hf:NAME. Repeat it to compare on several.",
    ),
    seq_len: int = typer.Option(512, "--seq-len", help="Window length in tokens."),
    max_windows: int = typer.Option(
        DEFAULT_MAX_WINDOWS, "--max-windows", help="Evaluate the first N windows of the split."
    ),
    all_windows: bool = typer.Option(False, "--all-windows", help="Evaluate every window."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    batch_size: int = typer.Option(1, "--batch-size", help="Windows per forward call."),
    max_perplexity: float = typer.Option(
        None, "--max-perplexity", help="Exit 1 if perplexity is above this."
    ),
    max_weight_bytes: str = typer.Option(
        None,
        "--max-weight-bytes",
        help="Exit 1 if weights take more (300MB, 1.5GiB, bytes); in a comparison, any variant's.",
    ),
    max_perplexity_increase: float = typer.Option(
        None,
        "--max-perplexity-increase",
        help="Comparison: exit 1 if a variant's perplexity is over PCT percent above the base's.",
    ),
    summary: str = typer.Option(
        None, "--summary", help="Comparison: also write the table as Markdown to FILE.md."
    ),
    allow_pickle: bool = typer.Option(
        False, "--allow-pickle", help="Load pickle checkpoints (unsafe: pickle runs code)."
    ),
    budget: str = typer.Option(
        None, "--budget", help="BitStack stack: load the blocks that fit this many weight bytes."
    ),
    budgets: str = typer.Option(
        None, "--budgets", help="BitStack stack: measure at each size (250MB,300MB,400MB)."
    ),
    plot: str = typer.Option(
        None,
        "--plot",
        help="Perplexity against bytes to FILE.png (a --budgets sweep, or a comparison with its "
        "Pareto frontier).",
    ),
    density_profile: str = typer.Option(
        None,
        "--density-profile",
        help="Reference profile (JSON, kind ladder or densing): report effective parameters "
        "N_hat, capacity density N_hat/N with a 90% bootstrap interval, and inference-time "
        "density.",
    ),
    time_ratio: float = typer.Option(
        1.0,
        "--time-ratio",
        help="r of the inference-time density: compute time / memory time per parameter.",
    ),
    min_density: float = typer.Option(
        None, "--min-density", help="Exit 1 if capacity density is below this (needs a profile)."
    ),
    tasks: list[str] = typer.Option(
        None,
        "--tasks",
        help="Score on an lm-eval task (needs pip install 'memtool\\[eval]'): a multiple-choice "
        'FILE.jsonl ({"query", "choices", "answer"} per line), an lm-eval task FILE.yaml, or a '
        "task name. Repeat it for several.",
    ),
    task_limit: int = typer.Option(
        None, "--task-limit", help="Score at most N items of each task."
    ),
    build_profile: str = typer.Option(
        None,
        "--build-profile",
        help="'ladder': measure the models as a reference ladder and write its density profile "
        "to --output.",
    ),
    output: str = typer.Option(None, "--output", "-o", help="With --build-profile: FILE.json."),
    json_out: bool = JsonOption,
    debug: bool = DebugOption,
) -> None:
    """Measure perplexity, parameters, bytes, bits per weight, peak memory and speed; with
    several models, compare them in one table."""

    def action() -> tuple[dict, list[str]]:
        # Parse sizes before the (slow) model load so bad input fails at once.
        weight_limit = parse_size(max_weight_bytes) if max_weight_bytes is not None else None
        if budget is not None and budgets is not None:
            raise MemtoolError("give --budget or --budgets, not both")
        sweep = [parse_size(b.strip()) for b in budgets.split(",")] if budgets else None
        specs = data or ["wiki"]
        config = MeasureConfig(
            data=specs[0],
            seq_len=seq_len,
            max_windows=None if all_windows else max_windows,
            dtype=dtype,
            batch_size=batch_size,
            allow_pickle=allow_pickle,
            budget=parse_size(budget) if budget is not None else None,
            density_profile=density_profile,
            time_ratio=time_ratio,
            tasks=tuple(tasks or ()),
            task_limit=task_limit,
        )
        config.validate()
        if build_profile is not None:
            return _build_profile(build_profile, output, models, specs, config)
        if output is not None:
            raise MemtoolError("--output applies to --build-profile")
        comparing = models is not None and len(models) > 1
        if not comparing:
            for flag, value in (
                ("--max-perplexity-increase", max_perplexity_increase),
                ("--summary", summary),
            ):
                if value is not None:
                    raise MemtoolError(f"{flag} applies to a comparison: give two models or more")
            if len(specs) > 1:
                raise MemtoolError("several --data need a comparison: give two models or more")
            if plot is not None and budgets is None:
                raise MemtoolError("--plot draws a --budgets sweep: pass --budgets too")
        if min_density is not None and density_profile is None:
            raise MemtoolError("--min-density needs --density-profile (the reference to compare)")
        if comparing:
            if budget is not None:
                raise MemtoolError(
                    "a comparison takes --budgets (for its BitStack stacks), not --budget"
                )
            return run_comparison(
                models,
                specs,
                config,
                sweep,
                Gates(max_perplexity, weight_limit, max_perplexity_increase, min_density),
                plot,
                summary,
            )
        model = models[0] if models else None
        if sweep is None:
            report = measure(model, config)
            gates = threshold_failures(report, max_perplexity, weight_limit, min_density)
            return report.to_dict(), gates
        reports = measure_budgets(model, sweep, config)
        failures = [
            f"at {format_size(r.budget_bytes)}: {failure}"
            for r in reports
            for failure in threshold_failures(r, max_perplexity, weight_limit)
        ]
        result = {"model": reports[0].model, "budgets": [r.to_dict() for r in reports]}
        if plot is not None:
            from memtool.plots import plot_perplexity_vs_bytes

            points = [(r.weight_bytes, r.perplexity) for r in reports]
            title = f"{reports[0].model}: perplexity on {reports[0].data}"
            result["plot"] = str(plot_perplexity_vs_bytes({"BitStack": points}, plot, title))
        return result, failures

    run_command(action, json_out=json_out, debug=debug, render=_render)


def _build_profile(
    kind: str, output: str | None, models, specs: list[str], config: MeasureConfig
) -> tuple[dict, list[str]]:
    from pathlib import Path

    from memtool.atomic import atomic_file
    from memtool.measurement import build_ladder

    if kind != "ladder":
        raise MemtoolError(f"--build-profile {kind!r}: memtool builds 'ladder' profiles")
    if output is None:
        raise MemtoolError("--build-profile needs --output FILE.json")
    if len(specs) > 1:
        raise MemtoolError("a ladder is measured on one --data")
    profile = build_ladder(list(models or []), config)
    with atomic_file(Path(output)) as tmp:
        tmp.write_text(json.dumps(profile, indent=1))
    return {"profile": str(output), **profile}, []


def _render(report: dict) -> None:
    if "profile" in report and "points" in report:
        fit = report.get("fit")
        shown = (
            f"L(N) = {fit['a']:.4g}·N^-{fit['alpha']:.3f} + {fit['E']:.4g}"
            if fit
            else "two points: interpolated in log N"
        )
        Console().print(
            f"[bold green]Wrote[/] {report['profile']}: ladder of {len(report['points'])} "
            f"models, {shown}"
        )
        return
    if "rows" in report:
        render_comparison(report)
    elif "budgets" in report:
        _render_budgets(report)
    else:
        _render_one(report)


def _render_budgets(result: dict) -> None:
    reports = result["budgets"]
    first = reports[0]
    table = Table(title=f"memtool measure: {result['model']} at {len(reports)} budgets")
    for column in ("budget", "weight bytes", "blocks", "bits/weight (linear)", "perplexity"):
        table.add_column(column, justify="right")
    for r in reports:
        table.add_row(
            format_size(r["budget_bytes"]),
            format_size(r["weight_bytes"]),
            str(r["stack_blocks"]),
            f"{r['bits_per_weight_linear']:.2f}",
            f"{r['perplexity']:.4f}",
        )
    console = Console()
    console.print(table)
    console.print(
        f"[dim]data: {first['data']} ({first['split']} split, {first['windows']} windows x "
        f"{first['seq_len']}); KV cache per batch {format_size(first['kv_cache_bytes'])}, "
        "not in weight bytes; protocol: "
        f"{first['protocol']}[/]"
    )
    if "plot" in result:
        console.print(f"plot: {result['plot']}")


def _render_one(report: dict) -> None:
    table = Table(title=f"memtool measure: {report['model']}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("perplexity", f"{report['perplexity']:.4f}"),
        (
            "data",
            f"{report['data']} ({report['split']} split, {report['windows']} windows x "
            f"{report['seq_len']} = {report['eval_tokens']} tokens)",
        ),
        (
            "parameters",
            f"{report['params_total']:,} ({report['params_non_embedding']:,} non-embedding)",
        ),
        ("bytes on disk", format_size(report["bytes_on_disk"])),
        ("weight bytes in memory", f"{format_size(report['weight_bytes'])} ({report['dtype']})"),
        ("KV cache per batch", format_size(report["kv_cache_bytes"])),
        (
            "bits per weight",
            f"{report['bits_per_weight']:.2f} (linear layers "
            f"{report['bits_per_weight_linear']:.2f})",
        ),
        ("peak RSS", format_size(report["peak_rss_bytes"])),
        ("throughput", f"{report['tokens_per_s']:.1f} tokens/s"),
    ]
    if report["stack_blocks"] is not None:
        budget = format_size(report["budget_bytes"]) if report["budget_bytes"] else "whole stack"
        rows.append(("BitStack", f"budget {budget}, {report['stack_blocks']} blocks"))
    if report.get("capacity_density") is not None:
        bound = report["effective_params_bound"]
        rows.append(("effective parameters", f"{bound}{report['effective_params']:,.0f}"))
        interval = report["capacity_density_interval"]
        shown = f"{report['capacity_density']:.3g}"
        if interval:
            shown += f" (90%: {interval[0]:.3g}-{interval[1]:.3g})"
        rows.append(("capacity density", shown))
        rows.append(
            (
                "inference-time density",
                f"{report['inference_time_density']:.3g} (r = {report['inference_time_ratio']:g})",
            )
        )
        if report["density_flags"]:
            rows.append(("density flags", ", ".join(report["density_flags"])))
    for task, scores in (report.get("task_scores") or {}).items():
        shown = ", ".join(
            f"{name} {value:.4f}" + (f" ± {scores[name + '_stderr']:.4f}"
                                     if isinstance(scores.get(name + "_stderr"), float) else "")
            for name, value in scores.items()
            if name != "samples" and not name.endswith("_stderr")
        )  # fmt: skip
        rows.append((f"task {task}", f"{shown} ({scores['samples']} items)"))
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)
    Console().print(f"[dim]protocol: {report['protocol']}[/]")
