"""`memtool compress`: quantize a model and write it in a format the ecosystem loads."""

import typer
from rich.console import Console

from memtool.cli.common import DebugOption, JsonOption, run_command
from memtool.compress import (
    AWQConfig,
    BnbConfig,
    CalibrationConfig,
    GPTQConfig,
    RTNConfig,
    compress,
)
from memtool.errors import MemtoolError
from memtool.recipes import load_recipe, run_recipe

METHODS = {
    "rtn": RTNConfig,
    "gptq": GPTQConfig,
    "awq": AWQConfig,
    "nf4": BnbConfig,
    "fp4": BnbConfig,
    "int8": BnbConfig,
}


def compress_command(
    model: str = typer.Argument(
        None, help="Built-in name, model folder, .gguf file or hub id. Default: smollm2-135m."
    ),
    output: str = typer.Option(None, "--output", "-o", help="Folder to write (must not exist)."),
    recipe: str = typer.Option(
        None, "--recipe", help="Run the pipeline in a TOML/YAML recipe (see recipes/)."
    ),
    method: str = typer.Option("gptq", "--method", help="gptq, awq, rtn, nf4, fp4 or int8."),
    bits: int = typer.Option(
        None, "--bits", help="2, 3, 4 or 8 (gptq/awq/rtn; default 4). nf4/fp4 are 4-bit, int8 8."
    ),
    group_size: int = typer.Option(128, "--group-size", help="Columns per group; -1 per channel."),
    sym: bool = typer.Option(
        None, "--sym/--asym", help="Symmetric or asymmetric groups (gptq/rtn: sym, awq: asym)."
    ),
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
    """Quantize a model: GPTQ or round-to-nearest (GPTQ checkpoint layout), or bitsandbytes
    NF4/FP4/int8 (the checkpoint transformers writes)."""

    def action() -> tuple[dict, list[str]]:
        if recipe is not None:
            return run_recipe(load_recipe(recipe), output=output, overwrite=overwrite)
        if output is None:
            raise MemtoolError("--output is required (the folder to write), or pass --recipe")
        config_type = METHODS.get(method)
        if config_type is None:
            raise MemtoolError(f"unknown method {method!r}: available now are {', '.join(METHODS)}")
        if config_type is BnbConfig:
            config = BnbConfig(quant_type=method)
            if bits is not None and bits != config.bits:
                raise MemtoolError(f"--method {method} is {config.bits}-bit; drop --bits {bits}")
        else:
            options = {"bits": bits or 4, "group_size": group_size}
            if sym is not None:
                options["sym"] = sym
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
    if "recipe" in result:
        _render(result["compress"])
        for data, report in result["measure"].items():
            Console().print(
                f"measured {data}: perplexity {report['perplexity']:.3f}, "
                f"{report['bits_per_weight_linear']:.2f} bits per linear weight"
            )
        return
    console = Console()
    settings = result["settings"]
    shape = f"{settings['bits']}-bit"
    if "group_size" in settings:
        shape += f", group {settings['group_size']}, "
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
