"""Layer-by-layer calibrated quantization (the GPTQ recipe, shared by every calibrated method).

For each decoder layer in turn:
1. run the layer on its calibration inputs, accumulating each linear's input Hessian;
2. quantize the layer's linears (the method decides how, given the Hessians);
3. write the dequantized weights back and run the layer again: its outputs, computed through the
   quantized weights, are the next layer's inputs, so every layer is calibrated on what the
   quantized model before it really produces.
Only one layer's activations (inputs and outputs, [n_samples, seq_len, hidden]) are held at a
time, so memory stays bounded by one layer's work. With `keep_weights=False` a layer's float
linear weights are dropped once its outputs are computed (its `QuantizedWeight`s, a byte per
weight, stand for them) and put back, dequantized, by `SequentialResult.restore_weights`: the
float32 weights of the layers already done (most of a model by the end of the pass) are then
not held while the pass and the checkpoint writing run (issue 4's peak-memory target).
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
    outside_layers,
    upcast,
)
from memtool.compress.quantizer import QuantizedWeight
from memtool.metrics.memory import large_allocations_mapped, release_freed_memory
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
    # Linears whose float weights were dropped (`keep_weights=False`): name -> (module, dtype).
    released: dict[str, tuple[nn.Linear, torch.dtype]] = field(default_factory=dict, repr=False)
    # Modules left in their stored 16-bit dtype during the pass (`keep_weights=False`: the
    # input embedding, which only the capture reads): upcast by `restore_weights`.
    not_upcast: list[nn.Module] = field(default_factory=list, repr=False)

    def release(self, name: str, module: nn.Linear) -> None:
        """Drop `module`'s float weight; `weights[name]` stands for it until restored."""
        self.released[name] = (module, module.weight.dtype)
        module.weight = nn.Parameter(torch.empty(0, dtype=module.weight.dtype), False)

    def restore_weights(self) -> None:
        """Give every released linear its dequantized weight back (a trainable parameter, as
        loaded): the model is the fake-quantized one again."""
        # Normal tensors, not inference ones (the pass runs in inference mode): the parameters
        # may be trained later.
        with torch.inference_mode(False), torch.no_grad():
            for name, (module, dtype) in self.released.items():
                module.weight = nn.Parameter(self.weights[name].dequantize().to(dtype))
        self.released.clear()
        upcast(self.not_upcast)
        self.not_upcast.clear()


@torch.inference_mode()
def quantize_sequential(
    model: nn.Module,
    windows: torch.Tensor,
    quantize_group: GroupQuantizer,
    batch_size: int = 8,
    show_progress: bool = True,
    keep_weights: bool = True,
    true_sequential: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> SequentialResult:
    """Quantize every linear inside the decoder layers of `model`, in place (fake-quantized).

    Args:
        model: a float causal LM. Everything runs in float32: a model stored in 16 bits is
            upcast (exactly) outside the decoder layers first and then one layer at a time, as
            its turn comes, so no whole float32 copy of it is ever held.
        windows: calibration token windows [n_samples, seq_len].
        quantize_group: the method, applied to each group of linears sharing an input.
        batch_size: calibration windows per forward call.
        show_progress: draw a per-layer progress bar on stderr.
        keep_weights: False drops each layer's float linear weights once the next layer's
            inputs are computed, and leaves a 16-bit input embedding (which only the capture
            of layer 0's inputs reads; its outputs are cast to float32, exactly) in its stored
            dtype; call `restore_weights()` on the result to put them back (dequantized,
            upcast). If the pass fails, this is done before the error propagates.
        true_sequential: calibrate each group of linears sharing an input (q/k/v, o, gate/up,
            down) on inputs computed through the groups of the layer already quantized, one
            partial forward per group, as GPTQModel and the GPTQ reference do; False takes
            every Hessian of a layer from one forward through the unquantized layer.
        compute_dtype: run the layer forwards' matmuls under autocast to this dtype (bfloat16
            where it is native, `memtool.compress.precision`) and keep the hidden states
            between layers in it; the Hessians are accumulated in float32 regardless, and the
            quantization itself always runs in float32.
    """
    began = time.perf_counter()
    layers = decoder_layers(model)
    layers_prefix = next(name for name, m in model.named_modules() if m is layers)
    clock = PhaseClock("capture", "calibrate", "quantize", "propagate")
    result = SequentialResult({})
    outside = outside_layers(model)
    if not keep_weights:
        # A float32 copy of a (tied) embedding would be the pass's largest single tensor.
        # The embedding and a head tied to it: neither runs in the pass.
        shared = model.get_input_embeddings().weight
        result.not_upcast = [
            m for m in outside if any(p is shared for p in m.parameters(recurse=False))
        ]
        outside = [m for m in outside if m not in result.not_upcast]
    upcast(outside)
    try:
        inputs = capture_first_layer_inputs(model, windows, batch_size)
        inputs.set_compute_dtype(compute_dtype)
    except BaseException:
        result.restore_weights()
        raise
    clock.lap("capture")
    try:
        with large_allocations_mapped(), step_progress() as progress:
            task = progress.add_task(
                "Quantizing", total=len(layers), status="", visible=show_progress
            )
            for index, layer in enumerate(layers):
                prefix = f"{layers_prefix}.{index}"
                progress.update(task, status=f"layer {index}: calibrating")
                upcast(layer.modules())
                linears = linear_children(layer)
                remaining = dict(linears)
                while remaining:
                    # One pass for all the layer's Hessians, or (true sequential) one per group
                    # of linears, each through the groups already quantized before it.
                    max_groups = 1 if true_sequential else None
                    with HessianCollector(remaining, max_groups) as collector:
                        inputs.run(layer)
                    clock.lap("calibrate")
                    if not collector.groups:
                        break  # linears the forward never reaches: left as they are
                    progress.update(task, status=f"layer {index}: quantizing")
                    for group in collector.groups:
                        modules = [remaining.pop(name) for name in group.names]
                        _quantize_group(result, prefix, modules, group, quantize_group)
                    del collector
                    clock.lap("quantize")
                    progress.update(task, status=f"layer {index}: calibrating")
                inputs.advance(layer)
                if not keep_weights:
                    for name, module in linears.items():
                        result.release(f"{prefix}.{name}", module)
                release_freed_memory()
                clock.lap("propagate")
                progress.update(task, advance=1)
    except BaseException:
        result.restore_weights()  # the caller's model stays usable, as documented
        raise
    result.seconds = time.perf_counter() - began
    result.phase_seconds = clock.rounded()
    return result


def _quantize_group(
    result: SequentialResult,
    prefix: str,
    modules: list[nn.Linear],
    group: HessianGroup,
    quantize_group: GroupQuantizer,
) -> None:
    """Quantize one group of a layer's linears, write the dequantized weights back (the rest
    of the pass runs through them) and record the codes and any warnings."""
    quantized, warnings = quantize_group(modules, group)
    for name, module, weight in zip(group.names, modules, quantized, strict=True):
        result.weights[f"{prefix}.{name}"] = weight
        module.weight.copy_(weight.dequantize().to(module.weight.dtype))
    for warning in warnings:
        message = f"layer {prefix.rsplit('.', 1)[-1]} ({', '.join(group.names)}): {warning}"
        result.warnings.append(message)
        console.print(f"[yellow]warning:[/] {message}")
