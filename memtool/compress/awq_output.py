"""Where AWQ results go: the AWQ GEMM layout when it can hold them, else the GPTQ layout.

AutoAWQ's GEMM layout (`memtool.formats.awq_pack`) is 4-bit only and has no g_idx, so every
group must tile its layer's input exactly. Widths it cannot hold (2, 3 and 8 bits) and ragged
groups (576 inputs in groups of 128, as in SmolLM2-135M) are written in the GPTQ layout, which
holds any codes (its `quantization_config.meta.method` then says "awq"). With
`checkpoint_format="auto"` that choice is made per model and reported as a warning;
`"gemm"` refuses instead, `"gptq"` always writes GPTQ.
"""

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from memtool.compress.awq_groups import SUPPORTED_MODEL_TYPES, check_supported, model_type
from memtool.compress.config import AWQConfig
from memtool.compress.layers import decoder_layers, linear_children
from memtool.compress.quantizer import QuantizedWeight, resolve_group_size
from memtool.errors import MemtoolError
from memtool.formats.awq_checkpoint import awq_quantization_config, save_awq_checkpoint
from memtool.formats.awq_pack import AWQ_BITS, AWQ_PACK
from memtool.formats.gptq_checkpoint import gptq_quantization_config, save_gptq_checkpoint
from memtool.progress import console


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {
        f"layer {index} {name}": module
        for index, layer in enumerate(decoder_layers(model))
        for name, module in linear_children(layer).items()
    }


def _gemm_problem(model: nn.Module, config: AWQConfig) -> str | None:
    if config.bits != AWQ_BITS:
        return f"it holds 4-bit codes only, not {config.bits}-bit"
    for name, module in _linears(model).items():
        size = resolve_group_size(config.group_size, module.in_features)
        if module.in_features % size:
            return (
                f"{name} has {module.in_features} inputs, not a multiple of group size "
                f"{config.group_size}, and the layout has no g_idx for a ragged last group"
            )
        if module.out_features % AWQ_PACK:
            return f"{name} has {module.out_features} outputs, not a multiple of 8"
    return None


def choose_layout(model: nn.Module, config: AWQConfig) -> tuple[str, str | None]:
    """("gemm" | "gptq", a warning when "auto" could not use GEMM); checked before any work.

    Raises:
        MemtoolError: `checkpoint_format="gemm"` and the model does not fit it, or the GPTQ
            layout is needed and a dimension is not a multiple of 32.
    """
    problem = None if config.checkpoint_format == "gptq" else _gemm_problem(model, config)
    if config.checkpoint_format == "gemm" and problem:
        raise MemtoolError(f"the AWQ GEMM layout cannot hold this model: {problem}")
    if config.checkpoint_format == "gemm" or (config.checkpoint_format == "auto" and not problem):
        return "gemm", None
    for name, module in _linears(model).items():
        for dim in (module.in_features, module.out_features):
            if dim % 32:
                raise MemtoolError(
                    f"{name} is {module.out_features}x{module.in_features}: the GPTQ layout "
                    "needs both dimensions to be multiples of 32"
                )
    note = None
    if problem:
        note = f"wrote the GPTQ layout (meta.method 'awq') because the AWQ GEMM layout: {problem}"
    return "gptq", note


@dataclass
class AWQPlan:
    """What `compress` does with an `AWQConfig`, decided before any work."""

    rtn_fallback: bool  # the architecture has no scaling groups and fallback_rtn was asked for
    layout: str | None  # "gemm" | "gptq" when writing, else None
    warnings: list[str] = field(default_factory=list)


def plan_awq(model: nn.Module, config: AWQConfig, writing: bool) -> AWQPlan:
    """Check the architecture and pick the output layout; warnings are printed and returned.

    Raises:
        MemtoolError: the architecture has no scaling groups and `config.fallback_rtn` is not
            set (the message says how to set it), or no layout can hold the result.
    """
    plan = AWQPlan(rtn_fallback=False, layout=None)
    if model_type(model) not in SUPPORTED_MODEL_TYPES:
        if not config.fallback_rtn:
            check_supported(model)
        plan.rtn_fallback = True
        plan.warnings.append(
            f"AWQ has no scaling groups for model_type {model_type(model)!r}: quantized with "
            "round-to-nearest instead (fallback_rtn=True)"
        )
    if writing:
        plan.layout, note = choose_layout(model, config)
        if note:
            plan.warnings.append(note)
    for warning in plan.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    return plan


def save_awq(
    model: nn.Module,
    tokenizer,
    weights: dict[str, QuantizedWeight],
    config: AWQConfig,
    layout: str,
    meta: dict,
    output: Path,
    overwrite: bool = False,
) -> Path:
    """Write AWQ results in `layout` (from `choose_layout`), with `meta` recorded in the config."""
    if layout == "gemm":
        quant = awq_quantization_config(config.group_size, zero_point=not config.sym, extra=meta)
        return save_awq_checkpoint(model, tokenizer, weights, quant, output, overwrite)
    quant = gptq_quantization_config(config.bits, config.group_size, config.sym, False, extra=meta)
    return save_gptq_checkpoint(model, tokenizer, weights, quant, output, overwrite)
