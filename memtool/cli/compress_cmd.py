"""`memtool compress`: quantize a model and write it in a format the ecosystem loads."""

import typer
from rich.console import Console

from memtool.cli.common import DebugOption, JsonOption, run_command
from memtool.compress import (
    AWQConfig,
    BitStackConfig,
    BnbConfig,
    CalibrationConfig,
    GPTQConfig,
    RTNConfig,
    compress,
)
from memtool.errors import MemtoolError
from memtool.progress import console as stderr
from memtool.recipes import load_recipe, run_recipe
from memtool.sizes import format_size

METHODS = {
    "rtn": RTNConfig,
    "gptq": GPTQConfig,
    "awq": AWQConfig,
    "nf4": BnbConfig,
    "fp4": BnbConfig,
    "int8": BnbConfig,
    "bitstack": BitStackConfig,
}
# BitStack's statistics pass is the whole-model forward GPTQ avoids; 64 windows is what the
# official code's comparison in the issue used.
DEFAULT_CALIB_SAMPLES = {"bitstack": 64}


# What --recipe leaves to the command line; the recipe describes everything else.
_RECIPE_FLAGS = {"recipe", "output", "overwrite", "json_out", "debug"}


def _refuse_flags_beside_a_recipe(ctx: typer.Context) -> None:
    """A model or option given with --recipe would be silently ignored: say so instead."""
    given = [
        param
        for param in ctx.command.params
        if param.name not in _RECIPE_FLAGS
        # by name: typer carries its own copy of click, whose enum is not click's
        and getattr(ctx.get_parameter_source(param.name), "name", None) == "COMMANDLINE"
    ]
    if given:
        names = ", ".join(param.opts[0] if param.opts[0].startswith("-") else param.name.upper()
                          for param in given)  # fmt: skip
        raise MemtoolError(
            f"--recipe describes the whole run; {names} would be ignored: put it in the recipe "
            "(only --output and --overwrite go beside it)"
        )


def compress_command(
    ctx: typer.Context,
    model: str = typer.Argument(
        None, help="Built-in name, model folder, .gguf file or hub id. Default: smollm2-135m."
    ),
    output: str = typer.Option(None, "--output", "-o", help="Folder to write (must not exist)."),
    recipe: str = typer.Option(
        None, "--recipe", help="Run the pipeline in a TOML/YAML recipe (see recipes/)."
    ),
    method: str = typer.Option(
        "gptq",
        "--method",
        help="gptq, awq, rtn, nf4, fp4, int8, bitstack, or flash-store (for serve-local "
        "--memory-budget: FFN neurons bundled for streaming, with sparsity predictors).",
    ),
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
        help="GPTQ: quantize columns by decreasing Hessian diagonal.",
    ),
    static_groups: bool = typer.Option(
        False,
        "--static-groups/--dynamic-groups",
        help="GPTQ act-order: groups fitted in act order (shuffled g_idx, GPTQModel's default; "
        "more accurate) or on the original column order (g_idx = i // group: no reordering "
        "at inference).",
    ),
    true_sequential: bool | None = typer.Option(
        None,
        "--true-sequential/--one-pass",
        help="GPTQ: calibrate each group of a layer's linears through the groups already "
        "quantized (one partial forward per group), or all of a layer's from one forward. "
        "Default: true sequential at 3 bits and below (more accurate there), one pass above "
        "(as accurate, faster).",
        show_default=False,
    ),
    damp_percent: float = typer.Option(
        None,
        "--damp-percent",
        help="GPTQ: initial dampening (default 0.01); BitStack: the feedback Hessian's "
        "(see docs for the default).",
    ),
    calib: str = typer.Option("wiki", "--calib", help="Calibration data spec (see measure)."),
    calib_samples: int = typer.Option(
        None, "--calib-samples", help="Calibration windows (default 128; bitstack 64)."
    ),
    niter: int = typer.Option(16, "--niter", help="BitStack: residual blocks per linear."),
    rank: int = typer.Option(
        None,
        "--rank",
        help="BitStack: rank of every block (default: per shape, see docs).",
    ),
    predictor: str = typer.Option(
        None,
        "--predictor",
        help="flash-store: neuron predictor quant:BITS or lowrank:RANK (default quant:4 for "
        "SwiGLU, lowrank:hidden/16 for ReLU).",
    ),
    gate_resident: bool = typer.Option(
        False,
        "--gate-resident",
        help="flash-store: keep the gate (SwiGLU) or fc1 (ReLU) in memory, so neurons are "
        "selected exactly (CATS thresholds, ReLU zeros) instead of by a predictor.",
    ),
    block_bits: float = typer.Option(
        1.25, "--block-bits", help="BitStack: bits per weight of a block when choosing ranks."
    ),
    order: str = typer.Option(
        "importance", "--order", help="BitStack: stack order, importance or uniform."
    ),
    token_weighting: bool = typer.Option(
        False,
        "--token-weighting/--no-token-weighting",
        help="BitStack: correct the importance estimate for how each linear's inputs and "
        "output gradients correlate across tokens: better on the score windows' text, worse "
        "on other text (see docs).",
    ),
    output_weighting: float = typer.Option(
        1.0,
        "--output-weighting",
        help="BitStack: fit each block's magnitudes with every output row weighted by "
        "sqrt(its mean squared loss gradient) to this power; 0 weights rows alike, as the "
        "paper does (see docs).",
    ),
    score_samples: int = typer.Option(
        None,
        "--score-samples",
        help="BitStack: windows back-propagated to score blocks and for the feedback Hessians "
        "(default 16, or all calibration windows when fewer).",
    ),
    score_calib: str = typer.Option(
        None,
        "--score-calib",
        help="BitStack: data spec of the score windows (default: the first calibration "
        "windows); e.g. --calib mixed --score-calib wiki takes the scales from both kinds of "
        "text and steers the feedback by wiki.",
    ),
    feedback: bool = typer.Option(
        None,
        "--feedback/--no-feedback",
        help="BitStack: choose each block's signs with GPTQ-style error feedback through the "
        "score windows' input Hessians (see docs for the default).",
        show_default=False,
    ),
    stats_dtype: str = typer.Option(
        "auto",
        "--stats-dtype",
        help="BitStack, GPTQ, AWQ: matmul dtype of the calibration forwards: auto (bfloat16 where "
        "the hardware has it natively), float32 or bfloat16. Statistics stay float32.",
    ),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per calibration window."),
    seed: int = typer.Option(0, "--seed", help="Seed for drawing calibration windows."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    json_out: bool = JsonOption,
    debug: bool = DebugOption,
) -> None:
    """Compress a model: GPTQ, AWQ or round-to-nearest (GPTQ/AWQ checkpoint layouts),
    bitsandbytes NF4/FP4/int8 (the checkpoint transformers writes), or a BitStack stack that
    loads at any memory budget."""

    def action() -> tuple[dict, list[str]]:
        if recipe is not None:
            _refuse_flags_beside_a_recipe(ctx)
            return run_recipe(load_recipe(recipe), output=output, overwrite=overwrite)
        if output is None:
            raise MemtoolError("--output is required (the folder to write), or pass --recipe")
        if method == "flash-store":
            args = (gate_resident, calib, calib_samples, seq_len, predictor, seed)
            return _flash_store(model, output, *args), []
        config_type = METHODS.get(method)
        if config_type is None:
            names = ", ".join([*METHODS, "flash-store"])
            raise MemtoolError(f"unknown method {method!r}: available now are {names}")
        if config_type is BitStackConfig:
            given = {"feedback": feedback, "damp_percent": damp_percent}
            config = BitStackConfig(
                niter=niter,
                rank=rank,
                block_bits=block_bits,
                order=order,
                token_weighting=token_weighting,
                output_weighting=output_weighting,
                score_samples=score_samples,
                score_data=score_calib,
                stats_dtype=stats_dtype,
                seed=seed,
                **{key: value for key, value in given.items() if value is not None},
            )
        elif config_type is BnbConfig:
            config = BnbConfig(quant_type=method)
            if bits is not None and bits != config.bits:
                raise MemtoolError(f"--method {method} is {config.bits}-bit; drop --bits {bits}")
        else:
            options = {"bits": bits or 4, "group_size": group_size}
            if sym is not None:
                options["sym"] = sym
            if config_type is GPTQConfig:
                options.update(
                    act_order=act_order,
                    static_groups=static_groups,
                    true_sequential=true_sequential,
                    damp_percent=0.01 if damp_percent is None else damp_percent,
                )
            if config_type in (GPTQConfig, AWQConfig):
                options["stats_dtype"] = stats_dtype
            config = config_type(**options)
        samples = calib_samples
        if samples is None:
            samples = DEFAULT_CALIB_SAMPLES.get(method, 128)
        calibration = CalibrationConfig(data=calib, n_samples=samples, seq_len=seq_len, seed=seed)
        result, _, _ = compress(
            model, config, calibration, output=output, overwrite=overwrite, keep_model=False
        )
        return result.to_dict(), []

    run_command(action, json_out=json_out, debug=debug, render=_render)


def _flash_store(model, output, gate_resident, calib, calib_samples, seq_len, predictor, seed):
    from memtool.serve.flash.build import FlashStoreConfig, compress_flash_store

    config = FlashStoreConfig(
        gate_resident=gate_resident,
        calib=calib,
        calib_samples=calib_samples or FlashStoreConfig.calib_samples,
        seq_len=seq_len,
        predictor=predictor,
        seed=seed,
    )
    return compress_flash_store(model, output, config)


def _render(result: dict) -> None:
    for warning in result.get("warnings", []):  # recipes: printed with their "compress"
        stderr.print(f"[bold yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    if "recipe" in result:
        _render(result["compress"])
        for data, report in result["measure"].items():
            Console().print(
                f"measured {data}: perplexity {report['perplexity']:.3f}, "
                f"{report['bits_per_weight_linear']:.2f} bits per linear weight"
            )
        return
    console = Console()
    if result.get("method") == "flash-store":
        console.print(
            f"[bold green]Wrote[/] {result['output']}: flash store ({result['kind']}, "
            f"{result['layers']} layers): {format_size(result['resident_bytes'])} resident, "
            f"{format_size(result['ffn_bytes'])} of FFN bundles, predictor "
            f"{result['predictor']}; serve with memtool serve-local DIR --memory-budget SIZE"
        )
        return
    settings = result["settings"]
    if settings["method"] == "bitstack":
        details = result["details"]
        console.print(
            f"[bold green]Wrote[/] {result['output']}: BitStack stack of {details['blocks']} "
            f"blocks over {result['quantized_layers']} linears in {result['seconds']:.0f} s; "
            f"loadable from {format_size(details['min_bytes'])} to "
            f"{format_size(details['max_bytes'])} (memtool measure DIR --budget SIZE)"
        )
        _render_calibration(console, result["calibration"])
        _render_calibration(console, details.get("score_calibration"), "score windows")
        return
    shape = f"{settings['bits']}-bit"
    if "group_size" in settings:
        shape += f", group {settings['group_size']}, "
        shape += "symmetric" if settings["sym"] else "asymmetric"
    console.print(
        f"[bold green]Wrote[/] {result['output']}: {result['method']} {shape}, "
        f"{result['quantized_layers']} linear layers in {result['seconds']:.0f} s"
    )
    _render_calibration(console, result["calibration"])


def _render_calibration(console: Console, calib: dict | None, what: str = "calibration") -> None:
    if calib:
        console.print(
            f"{what}: {calib['data']} ({calib['split']} split), {calib['n_windows']} windows "
            f"x {calib['seq_len']} tokens, seed {calib['seed']}"
        )
