"""Layer-by-layer calibrated quantization (the GPTQ recipe, shared by every calibrated method).

For each decoder layer in turn:
1. run the layer on its calibration inputs, accumulating each linear's input Hessian;
2. quantize the layer's linears (the method decides how, given the Hessians);
3. write the dequantized weights back and run the layer again: its outputs, computed through the
   quantized weights, are the next layer's inputs, so every layer is calibrated on what the
   quantized model before it really produces.
Only one layer's activations (inputs and outputs, [n_samples, seq_len, hidden]) are held at a
time, so memory stays bounded by one layer's work.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from memtool.compress.hessian import HessianCollector, HessianGroup
from memtool.compress.layers import (
    PhaseClock,
    capture_first_layer_inputs,
    decoder_layers,
    linear_children,
)
from memtool.compress.quantizer import QuantizedWeight
from memtool.metrics.memory import release_freed_memory
from memtool.progress import console, step_progress

# A method quantizes one Hessian group (linears sharing one input) and returns per-linear
# results plus warnings to show.
GroupQuantizer = Callable[[list[nn.Linear], HessianGroup], tuple[list[QuantizedWeight], list[str]]]


@dataclass
class SequentialResult:
    weights: dict[str, QuantizedWeight]  # full module name -> quantized weight
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # Wall time per phase: capture (embeddings), calibrate (forward + Hessians), quantize,
    # propagate (forward through the quantized layer): where to look before optimising.
    phase_seconds: dict[str, float] = field(default_factory=dict)


@torch.inference_mode()
def quantize_sequential(
    model: nn.Module,
    windows: torch.Tensor,
    quantize_group: GroupQuantizer,
    batch_size: int = 8,
    show_progress: bool = True,
) -> SequentialResult:
    """Quantize every linear inside the decoder layers of `model`, in place (fake-quantized).

    Args:
        model: a float causal LM (float32 recommended: Hessians and errors are float32).
        windows: calibration token windows [n_samples, seq_len].
        quantize_group: the method, applied to each group of linears sharing an input.
        batch_size: calibration windows per forward call.
        show_progress: draw a per-layer progress bar on stderr.
    """
    began = time.perf_counter()
    layers = decoder_layers(model)
    layers_prefix = next(name for name, m in model.named_modules() if m is layers)
    clock = PhaseClock("capture", "calibrate", "quantize", "propagate")
    inputs = capture_first_layer_inputs(model, windows, batch_size)
    result = SequentialResult({})
    clock.lap("capture")

    with step_progress() as progress:
        task = progress.add_task("Quantizing", total=len(layers), status="", visible=show_progress)
        for index, layer in enumerate(layers):
            progress.update(task, status=f"layer {index}: calibrating")
            linears = linear_children(layer)
            with HessianCollector(linears) as collector:
                inputs.run(layer)
            clock.lap("calibrate")
            progress.update(task, status=f"layer {index}: quantizing")
            for group in collector.groups:
                modules = [linears[name] for name in group.names]
                quantized, warnings = quantize_group(modules, group)
                for name, module, weight in zip(group.names, modules, quantized, strict=True):
                    full_name = f"{layers_prefix}.{index}.{name}"
                    result.weights[full_name] = weight
                    module.weight.copy_(weight.dequantize().to(module.weight.dtype))
                for warning in warnings:
                    message = f"layer {index} ({', '.join(group.names)}): {warning}"
                    result.warnings.append(message)
                    console.print(f"[yellow]warning:[/] {message}")
            del collector
            clock.lap("quantize")
            inputs.advance(layer)
            release_freed_memory()
            clock.lap("propagate")
            progress.update(task, advance=1)
    result.seconds = time.perf_counter() - began
    result.phase_seconds = clock.rounded()
    return result
