"""AWQ: Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration" (MLSys 2024), following the reference implementations llm-awq and AutoAWQ.

Salient weight channels are those that meet large activations. AWQ protects them without mixed
precision: for each group of linears reading one input (`memtool.compress.awq_groups`) it scales
input channel j by s_j = s_x[j]^alpha (s_x = mean |x| per channel), folding 1/s into the previous
norm or linear so the float function is unchanged, with alpha picked on a grid by the group's
output error after quantization (`awq_search.search_scale`). It then clips each linear's groups
to the range that best preserves its outputs (`awq_search.search_clip`) and rounds to nearest.

Per decoder layer, as in AutoAWQ's `AwqQuantizer.quantize`: record the inputs of every linear and
of the inspected blocks; search every group's scale on the float weights; fold all scales; search
the clipping on the scaled weights with the correspondingly scaled inputs (q and k are not
clipped); quantize every linear.

What memtool does differently, on purpose:
- Inputs of layer i+1 are recomputed through the already-quantized layer i (as memtool's GPTQ
  does); AutoAWQ feeds each layer the float model's activations.
- One quantizer for every method (`memtool.compress.quantizer`): its range includes 0, scales are
  rounded to float16 when fitted, asymmetric zero points lie in [1, 2^bits - 1] and symmetric
  groups use zero 2^(bits-1) (GPTQ's convention) rather than AutoAWQ's signed range. Groups may
  be ragged (576 inputs, group 128), which the AWQ GEMM layout cannot store (`awq_output`).
- The scale exponent is s_x^alpha as in the paper and llm-awq; AutoAWQ's default `duo_scaling`
  (also dividing by a weight magnitude term) is `AWQConfig(duo_scaling=True)`.
- Every calibration window is used for the scale search, batch by batch, in float32.
"""

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from memtool.compress.awq_groups import NO_CLIP, ScaleGroup, apply_scale, scaling_groups
from memtool.compress.awq_search import (
    Call,
    channel_mean_abs,
    sample_tokens,
    search_clip,
    search_scale,
    weight_mean,
)
from memtool.compress.config import AWQConfig
from memtool.compress.layers import (
    PhaseClock,
    capture_first_layer_inputs,
    decoder_layers,
    linear_children,
)
from memtool.compress.precision import autocast_to
from memtool.compress.quantizer import QuantizedWeight, rtn_quantize
from memtool.compress.sequential import SequentialResult
from memtool.progress import step_progress


@dataclass
class AWQResult(SequentialResult):
    """`SequentialResult` plus the alpha chosen for each scaling group."""

    alphas: dict[str, float] = field(default_factory=dict)  # "layers.3: prev -> linears" -> alpha


@dataclass
class _Recorded:
    """One layer's calibration traffic: per batch, each linear's input and each block's call."""

    inputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    calls: dict[str, list[Call]] = field(default_factory=dict)


@contextlib.contextmanager
def _recording(layer: nn.Module, linears: list[str], blocks: list[str]) -> Iterator[_Recorded]:
    """Hooks that record while the layer runs. Inputs shared by several linears (q/k/v, gate/up)
    are the same tensor, so they are held once."""
    recorded = _Recorded({name: [] for name in linears}, {name: [] for name in blocks})

    def on_linear(name):
        def hook(module, args, output):
            recorded.inputs[name].append(args[0].detach())

        return hook

    def on_block(name):
        def hook(module, args, kwargs):
            recorded.calls[name].append((args, dict(kwargs)))

        return hook

    handles = [layer.get_submodule(n).register_forward_hook(on_linear(n)) for n in linears]
    handles += [
        layer.get_submodule(n).register_forward_pre_hook(on_block(n), with_kwargs=True)
        for n in blocks
    ]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


def _fake_quantizer(config: AWQConfig):
    def fake_quantize(weight: torch.Tensor) -> torch.Tensor:
        return rtn_quantize(weight, config.bits, config.group_size, config.sym).dequantize()

    return fake_quantize


def _search_scales(
    layer: nn.Module,
    groups: list[ScaleGroup],
    linears: dict[str, nn.Linear],
    recorded: _Recorded,
    config: AWQConfig,
) -> list[tuple[ScaleGroup, torch.Tensor, float]]:
    """(group, scales, alpha) for every group, each searched on the float weights."""
    found = []
    for group in groups:
        members = [linears[name] for name in group.linears]
        w_mean = None
        if config.duo_scaling:
            w_mean = weight_mean([m.weight for m in members], config.group_size)
        scales, alpha, _ = search_scale(
            members,
            layer.get_submodule(group.inspect),
            recorded.calls[group.inspect],
            channel_mean_abs(recorded.inputs[group.linears[0]]),
            _fake_quantizer(config),
            n_grid=config.n_grid,
            w_mean=w_mean,
        )
        found.append((group, scales, alpha))
    return found


def _clip_and_quantize(
    linear: nn.Linear, x: list[torch.Tensor], divisor: torch.Tensor | None, config: AWQConfig
) -> QuantizedWeight:
    """Round `linear` to nearest after the clip search (skipped when `x` is empty), in place.

    `divisor` is the scale folded into the linear's input columns: its recorded float inputs
    `x` are divided by it so that x·wᵀ is what the scaled layer computes.
    """
    weight = linear.weight.detach().float()
    if x:
        sample = sample_tokens(x, config.clip_tokens)
        if divisor is not None:
            sample = sample / divisor.view(1, -1)
        weight = search_clip(
            weight,
            sample,
            config.bits,
            config.group_size,
            config.sym,
            n_grid=config.n_grid,
            max_shrink=config.max_shrink,
        )
    quantized = rtn_quantize(weight, config.bits, config.group_size, config.sym)
    linear.weight.copy_(quantized.dequantize().to(linear.weight.dtype))
    return quantized


@torch.inference_mode()
def quantize_awq(
    model: nn.Module,
    windows: torch.Tensor,
    config: AWQConfig,
    batch_size: int = 8,
    show_progress: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> AWQResult:
    """Quantize every linear inside the decoder layers of `model` with AWQ, in place.

    Afterwards the model computes with the fake-quantized weights and the scaled norms, i.e.
    exactly what a checkpoint of the returned weights computes.

    Args:
        model: a float causal LM of a supported architecture (float32 recommended).
        windows: calibration token windows [n_samples, seq_len].
        config: bits, group size, symmetry and the search settings.
        batch_size: calibration windows per forward call.
        show_progress: draw a per-layer progress bar on stderr.
        compute_dtype: run the layer forwards and the scale search's block forwards under
            autocast to this dtype (bfloat16 where native, `memtool.compress.precision`), the
            hidden states kept in it between layers; statistics, the clip search and the
            rounding stay float32.

    Raises:
        MemtoolError: AWQ has no scaling groups for the architecture.
    """
    began = time.perf_counter()
    layers = decoder_layers(model)
    scaling_groups(model, layers[0])  # unsupported architectures fail before any work
    prefix = next(name for name, m in model.named_modules() if m is layers)
    clock = PhaseClock("capture", "record", "scale_search", "clip_quantize", "propagate")
    inputs = capture_first_layer_inputs(model, windows, batch_size)
    inputs.set_compute_dtype(compute_dtype)
    device_type = next(model.parameters()).device.type
    result = AWQResult({})
    clock.lap("capture")

    with step_progress() as progress:
        task = progress.add_task("AWQ", total=len(layers), status="", visible=show_progress)
        for index, layer in enumerate(layers):
            progress.update(task, status=f"layer {index}: recording")
            groups = scaling_groups(model, layer)
            linears = linear_children(layer)
            blocks = sorted({g.inspect for g in groups})
            with _recording(layer, list(linears), blocks) as recorded:
                inputs.run(layer)
            clock.lap("record")

            progress.update(task, status=f"layer {index}: searching scales")
            divisors: dict[str, torch.Tensor] = {}
            # All searches saw the float weights (as in AutoAWQ); fold the scales afterwards.
            with autocast_to(device_type, compute_dtype):
                found = _search_scales(layer, groups, linears, recorded, config)
            for group, scales, alpha in found:
                apply_scale(layer, group, scales)
                divisors.update(dict.fromkeys(group.linears, scales))
                result.alphas[f"{prefix}.{index}: {group.label}"] = alpha
            clock.lap("scale_search")

            progress.update(task, status=f"layer {index}: clipping, quantizing")
            for name, linear in linears.items():
                clip = config.clip and name.rsplit(".", 1)[-1] not in NO_CLIP
                x = recorded.inputs[name] if clip else []
                quantized = _clip_and_quantize(linear, x, divisors.get(name), config)
                result.weights[f"{prefix}.{index}.{name}"] = quantized
            del recorded, divisors
            clock.lap("clip_quantize")
            inputs.advance(layer)
            clock.lap("propagate")
            progress.update(task, advance=1)
    result.seconds = time.perf_counter() - began
    result.phase_seconds = clock.rounded()
    return result
