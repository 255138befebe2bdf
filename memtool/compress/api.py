"""`compress`: the library call behind `memtool compress`.

One entry point for every method; each config type maps to its implementation. Calibrated
methods quantize layer by layer (`memtool.compress.sequential`); the result is written in a
format the ecosystem loads, atomically, with what was used (method, settings, calibration data)
recorded in its `quantization_config.meta`.
"""

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from memtool.compress.awq import quantize_awq
from memtool.compress.awq_output import plan_awq, save_awq
from memtool.compress.bitstack_pipeline import compress_bitstack
from memtool.compress.bnb import BnbConfig, bnb_quantize, save_bnb_checkpoint
from memtool.compress.config import (
    AWQConfig,
    BitStackConfig,
    CalibrationConfig,
    GPTQConfig,
    RTNConfig,
)
from memtool.compress.layers import decoder_layers, linear_children
from memtool.compress.methods import gptq_group_quantizer, rtn_linear
from memtool.compress.precision import dtype_name, resolve_compute_dtype
from memtool.compress.quantizer import QuantizedWeight
from memtool.compress.sequential import quantize_sequential
from memtool.errors import MemtoolError
from memtool.formats.gptq_checkpoint import (
    gptq_quantization_config,
    prepare_output,
    save_gptq_checkpoint,
)
from memtool.metrics.sizes import compressed_counts
from memtool.models import LoadedModel, load_model


@dataclass
class CompressResult:
    """What `compress` did; `to_dict()` is the CLI's JSON."""

    output: str | None
    method: str
    settings: dict
    calibration: dict | None
    quantized_layers: int
    seconds: float
    warnings: list[str] = field(default_factory=list)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    details: dict = field(default_factory=dict)  # method-specific facts (BitStack: sizes)

    def to_dict(self) -> dict:
        return asdict(self)


def compress(
    model: str | LoadedModel | None,
    config: RTNConfig | GPTQConfig | AWQConfig | BitStackConfig,
    calibration: CalibrationConfig | None = None,
    output: str | Path | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    keep_model: bool = True,
) -> tuple[CompressResult, dict[str, QuantizedWeight], LoadedModel | None]:
    """Quantize the decoder linears of `model` and (if `output` is given) save the result.

    Args:
        model: a source to load (None = the default model) or a loaded model, which is
            modified in place (its linears hold the dequantized weights afterwards). Every
            method computes in float32: GPTQ loads a source in its stored dtype and upcasts it
            layer by layer (`quantize_sequential`), the others load it in float32.
        config: `RTNConfig`, `GPTQConfig`, `AWQConfig`, `BnbConfig` or `BitStackConfig`.
        calibration: calibration windows for calibrated methods (default: 128 x 512 of wiki).
        output: folder to write (GPTQ layout; AWQ writes the AWQ GEMM layout when it can hold
            the result, see `memtool.compress.awq_output`; BitStack a stack folder, see
            `memtool.formats.bitstack_stack`); None to keep it in memory only (not BitStack).
        overwrite: replace an existing output folder.
        show_progress: progress bars on stderr.
        keep_model: False (with `output`) when only the written folder matters, as for the
            CLI: GPTQ then does not put back the float weights its pass dropped (a float32
            copy of every decoder linear, the job's largest allocation after the pass) and the
            third element returned is None (a `LoadedModel` passed in is left without them).

    Returns:
        (result summary, quantized weights by module name, the model with fake-quantized
        weights, usable to measure the quantization's effect without reloading, or None with
        `keep_model=False`; for BitStack, no weights and the written stack loaded whole).
    """
    config.validate()
    if not keep_model and output is None:
        raise MemtoolError("compress(keep_model=False) needs an output folder to write")
    calibration = calibration or CalibrationConfig()
    calibration.validate()
    if isinstance(config, BitStackConfig) and output is None:
        raise MemtoolError("BitStack writes a stack folder: pass --output")
    if output is not None:
        prepare_output(Path(output), overwrite)  # fail before hours of work, not after
    began = time.perf_counter()
    # GPTQ upcasts one layer at a time (`quantize_sequential`): a 16-bit checkpoint is never
    # held whole in float32. The other methods work on a float32 model.
    stored = isinstance(config, GPTQConfig)
    loaded = (
        model
        if isinstance(model, LoadedModel)
        else load_model(model, dtype="stored" if stored else "float32")
    )
    if isinstance(config, BitStackConfig):
        done = _compress_bitstack(loaded, config, calibration, Path(output), show_progress, began)
        return done[0], done[1], load_model(output) if keep_model else None
    if isinstance(config, BnbConfig):
        summary, weights, quantized = _compress_bnb(loaded, config, output, overwrite, began)
        return summary, weights, quantized if keep_model else None
    awq_plan = None
    if isinstance(config, AWQConfig):
        awq_plan = plan_awq(loaded.model, config, writing=output is not None)
    elif output is not None:
        _check_packable(loaded.model)
    warnings: list[str] = list(awq_plan.warnings) if awq_plan else []
    phases: dict[str, float] = {}
    calib_info = None
    sequential = None  # GPTQ's pass, whose dropped float weights come back after the save
    if awq_plan is not None and awq_plan.rtn_fallback:
        weights = _rtn_all(loaded.model, config)
    elif isinstance(config, (GPTQConfig, AWQConfig)):
        windows = calibration.windows(loaded.tokenizer)
        context = loaded.max_context
        if context is not None and calibration.seq_len > context:
            raise MemtoolError(
                f"--seq-len {calibration.seq_len} is above the model's context of {context}"
            )
        calib_info = windows.to_dict()
        device = next(loaded.model.parameters()).device
        compute_dtype = resolve_compute_dtype(config.stats_dtype, device)
        config = replace(config, stats_dtype=dtype_name(compute_dtype))  # what is recorded
        if isinstance(config, AWQConfig):
            result = quantize_awq(
                loaded.model,
                windows.input_ids,
                config,
                batch_size=calibration.batch_size,
                show_progress=show_progress,
                compute_dtype=compute_dtype,
            )
        else:
            # The layers done give up their float weights (their codes stand for them) until
            # the checkpoint is written: the job's peak memory (issue 4).
            result = quantize_sequential(
                loaded.model,
                windows.input_ids,
                gptq_group_quantizer(config),
                batch_size=calibration.batch_size,
                show_progress=show_progress,
                keep_weights=False,
                true_sequential=config.true_sequential,
                compute_dtype=compute_dtype,
            )
            sequential = result
        weights, phases = result.weights, result.phase_seconds
        warnings += result.warnings
    elif isinstance(config, RTNConfig):
        weights = _rtn_all(loaded.model, config)
    else:
        raise MemtoolError(f"unknown compression config {type(config).__name__}")
    settings = {"method": config.method, **asdict(config)}
    try:
        _save(loaded, config, weights, calib_info, awq_plan, output, overwrite)
    except BaseException:
        if sequential is not None:
            sequential.restore_weights()  # a caller's model stays usable when the save fails
        raise
    if sequential is not None and keep_model:
        sequential.restore_weights()
    summary = CompressResult(
        output=str(output) if output is not None else None,
        method=config.method,
        settings=settings,
        calibration=calib_info,
        quantized_layers=len(weights),
        seconds=time.perf_counter() - began,
        warnings=warnings,
        phase_seconds=phases,
    )
    return summary, weights, loaded if keep_model else None


def _save(
    loaded: LoadedModel,
    config: RTNConfig | GPTQConfig | AWQConfig,
    weights: dict[str, QuantizedWeight],
    calib_info: dict | None,
    awq_plan,
    output: str | Path | None,
    overwrite: bool,
) -> None:
    """Write the result in its format (nothing when `output` is None)."""
    if output is not None and awq_plan is not None:
        meta = {"method": config.method, "calibration": calib_info, **asdict(config)}
        save_awq(
            loaded.model,
            loaded.tokenizer,
            weights,
            config,
            awq_plan.layout,
            meta,
            Path(output),
            overwrite,
        )
    elif output is not None:
        quant_config = gptq_quantization_config(
            config.bits,
            config.group_size,
            config.sym,
            getattr(config, "act_order", False),
            extra={"method": config.method, "calibration": calib_info, **asdict(config)},
            static_groups=getattr(config, "static_groups", False),
            true_sequential=getattr(config, "true_sequential", False),
        )
        save_gptq_checkpoint(
            loaded.model, loaded.tokenizer, weights, quant_config, Path(output), overwrite
        )


def _compress_bnb(
    loaded: LoadedModel, config: BnbConfig, output, overwrite: bool, began: float
) -> tuple[CompressResult, dict[str, QuantizedWeight], LoadedModel]:
    quantized = bnb_quantize(loaded, config)
    if output is not None:
        save_bnb_checkpoint(quantized, loaded.tokenizer, Path(output), overwrite)
    result = CompressResult(
        output=str(output) if output is not None else None,
        method=config.method,
        settings={"method": config.method, "bits": config.bits, **asdict(config)},
        calibration=None,
        quantized_layers=sum(compressed_counts(m) is not None for m in quantized.modules()),
        seconds=time.perf_counter() - began,
    )
    bnb_loaded = LoadedModel(quantized, loaded.tokenizer, loaded.source, loaded.kind, loaded.path)
    return result, {}, bnb_loaded


def _compress_bitstack(
    loaded: LoadedModel,
    config: BitStackConfig,
    calibration: CalibrationConfig,
    output: Path,
    show_progress: bool,
    began: float,
) -> tuple[CompressResult, dict[str, QuantizedWeight]]:
    done = compress_bitstack(loaded, config, calibration, output, show_progress)
    result = CompressResult(
        output=str(output),
        method=config.method,
        settings={"method": config.method, **asdict(config)},
        calibration=done.pop("calibration"),
        quantized_layers=done.pop("quantized_layers"),
        seconds=time.perf_counter() - began,
        warnings=done.pop("warnings"),
        phase_seconds=done.pop("phase_seconds"),
        details=done,
    )
    return result, {}


def _check_packable(model: torch.nn.Module) -> None:
    """The GPTQ layout packs both dimensions into 32-bit words: refuse before any work."""
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        for name, module in linear_children(layer).items():
            for dim in (module.in_features, module.out_features):
                if dim % 32:
                    raise MemtoolError(
                        f"layer {index} {name} is {module.out_features}x{module.in_features}: "
                        "the GPTQ layout needs both dimensions to be multiples of 32"
                    )


@torch.inference_mode()
def _rtn_all(model: torch.nn.Module, config: RTNConfig) -> dict[str, QuantizedWeight]:
    layers = decoder_layers(model)
    prefix = next(name for name, m in model.named_modules() if m is layers)
    weights = {}
    for index, layer in enumerate(layers):
        for name, module in linear_children(layer).items():
            weight = rtn_linear(module, config)
            module.weight.copy_(weight.dequantize().to(module.weight.dtype))
            weights[f"{prefix}.{index}.{name}"] = weight
    return weights
