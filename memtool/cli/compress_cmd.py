"""`memtool compress`: quantize a model and write it in a format the ecosystem loads."""

import typer
from rich.console import Console

from memtool.cli.common import DebugOption, JsonOption, run_command
from memtool.compress import CalibrationConfig, GPTQConfig, RTNConfig, compress
from memtool.errors import MemtoolError

METHODS = {"rtn": RTNConfig, "gptq": GPTQConfig}


def compress_command(
    model: str = typer.Argument(
        None, help="Built-in name, model folder, .gguf file or hub id. Default: smollm2-135m."
    ),
    output: str = typer.Option(..., "--output", "-o", help="Folder to write (must not exist)."),
    method: str = typer.Option("gptq", "--method", help="gptq or rtn."),
    bits: int = typer.Option(4, "--bits", help="2, 3, 4 or 8."),
    group_size: int = typer.Option(128, "--group-size", help="Columns per group; -1 per channel."),
    sym: bool = typer.Option(True, "--sym/--asym", help="Symmetric or asymmetric groups."),
    act_order: bool = typer.Option(
        True,
        "--act-order/--no-act-order",
        help="GPTQ: quantize columns by decreasing Hessian diagonal (static groups).",
    ),
    damp_percent: float = typer.Option(0.01, "--damp-percent", help="GPTQ: initial dampening."),
    calib: str = typer.Option("wiki", "--calib", help="Calibration data spec (see measure)."),
    calib_samples: int = typer.Option(128, "--calib-samples", help="Calibration windows."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per calibration window."),
    seed: int = typer.Option(0, "--seed", help="Seed for drawing calibration windows."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    json_out: bool = JsonOption,
    debug: bool = DebugOption,
) -> None:
    """Quantize a model (GPTQ or round-to-nearest) into the standard GPTQ checkpoint layout."""

    def action() -> tuple[dict, list[str]]:
        config_type = METHODS.get(method)
        if config_type is None:
            raise MemtoolError(f"unknown method {method!r}: available now are {', '.join(METHODS)}")
        options = {"bits": bits, "group_size": group_size, "sym": sym}
        if config_type is GPTQConfig:
            options.update(act_order=act_order, damp_percent=damp_percent)
        config = config_type(**options)
        calibration = CalibrationConfig(
            data=calib, n_samples=calib_samples, seq_len=seq_len, seed=seed
        )
        result, _, _ = compress(model, config, calibration, output=output, overwrite=overwrite)
        return result.to_dict(), []

    run_command(action, json_out=json_out, debug=debug, render=_render)


def _render(result: dict) -> None:
    console = Console()
    settings = result["settings"]
    shape = f"{settings['bits']}-bit, group {settings['group_size']}, "
    shape += "symmetric" if settings["sym"] else "asymmetric"
    console.print(
        f"[bold green]Wrote[/] {result['output']}: {result['method']} {shape}, "
        f"{result['quantized_layers']} linear layers in {result['seconds']:.0f} s"
    )
    if result["calibration"]:
        calib = result["calibration"]
        console.print(
            f"calibration: {calib['data']} ({calib['split']} split), {calib['n_windows']} windows "
            f"x {calib['seq_len']} tokens, seed {calib['seed']}"
        )
