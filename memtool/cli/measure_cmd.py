"""`memtool measure`: perplexity, size and speed of a model, with CI gates."""

import typer
from rich.console import Console
from rich.table import Table

from memtool.cli.common import DebugOption, JsonOption, run_command
from memtool.measurement import DEFAULT_MAX_WINDOWS, MeasureConfig, measure, threshold_failures
from memtool.sizes import format_size, parse_size


def measure_command(
    model: str = typer.Argument(
        None, help="Built-in name, model folder, .gguf file or hub id. Default: smollm2-135m."
    ),
    data: str = typer.Option(
        "wiki",
        "--data",
        help="Evaluation data: wiki, code, mixed, a "
        ".txt/.jsonl file (FILE.jsonl:FIELD), a folder (DIR:GLOB), hf:NAME.",
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
        None, "--max-weight-bytes", help="Exit 1 if weights take more (300MB, 1.5GiB, bytes)."
    ),
    allow_pickle: bool = typer.Option(
        False, "--allow-pickle", help="Load pickle checkpoints (unsafe: pickle runs code)."
    ),
    json_out: bool = JsonOption,
    debug: bool = DebugOption,
) -> None:
    """Measure perplexity, parameters, bytes, bits per weight, peak memory and speed."""

    def action() -> tuple[dict, list[str]]:
        # Parse sizes before the (slow) model load so bad input fails at once.
        weight_limit = parse_size(max_weight_bytes) if max_weight_bytes is not None else None
        config = MeasureConfig(
            data=data,
            seq_len=seq_len,
            max_windows=None if all_windows else max_windows,
            dtype=dtype,
            batch_size=batch_size,
            allow_pickle=allow_pickle,
        )
        config.validate()
        report = measure(model, config)
        return report.to_dict(), threshold_failures(report, max_perplexity, weight_limit)

    run_command(action, json_out=json_out, debug=debug, render=_render)


def _render(report: dict) -> None:
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
        (
            "bits per weight",
            f"{report['bits_per_weight']:.2f} (linear layers "
            f"{report['bits_per_weight_linear']:.2f})",
        ),
        ("peak RSS", format_size(report["peak_rss_bytes"])),
        ("throughput", f"{report['tokens_per_s']:.1f} tokens/s"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)
    Console().print(f"[dim]protocol: {report['protocol']}[/]")
