"""Capturing what flows into a causal LM's first decoder layer (layers: memtool.models.layers).

Layer-by-layer compression (GPTQ, AWQ) never runs the whole model on the calibration set more
than once: we capture the hidden states (and the keyword arguments: attention mask, rotary
embeddings, ...) that reach decoder layer 0, then push them through one layer at a time.
"""

import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from memtool.compress.precision import autocast_to
from memtool.metrics.memory import drop_file_pages
from memtool.models.layers import decoder_layers


class StopLayer(Exception):
    """Raised by a hook once a layer's forward has recorded everything asked of it: the rest of
    that batch's forward is skipped (`LayerInputs.run`)."""


class _StopForward(Exception):
    """Raised by the capture hook once layer 0's inputs are recorded: nothing after it runs."""


@dataclass
class LayerInputs:
    """Hidden states entering a decoder layer, in batches, with each batch's other arguments.

    With a `compute_dtype` (say bfloat16, see `memtool.compress.precision`) the layer forwards
    run their matmuls under autocast to it, and the hidden states are kept in it between layers
    (half the pass's largest holding); each batch enters a layer in float32, so the layer's own
    arithmetic outside the matmuls (norms, residual sums) is float32 as without it.
    """

    hidden: list[torch.Tensor]  # one [B, L, D] tensor per batch
    kwargs: list[dict[str, Any]]  # the layer's keyword arguments for that batch
    compute_dtype: torch.dtype | None = None

    @property
    def n_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)

    def set_compute_dtype(self, dtype: torch.dtype | None) -> None:
        """Run later forwards under autocast to `dtype` and keep the hidden states in it."""
        self.compute_dtype = dtype
        self.hidden = [self._kept(h) for h in self.hidden]

    def run(self, layer: nn.Module) -> None:
        """Run every batch through `layer` (outputs discarded): hooks on it see the inputs, and
        may end a batch early by raising `StopLayer`."""
        for hidden, kwargs in zip(self.hidden, self.kwargs, strict=True):
            with contextlib.suppress(StopLayer):
                self._forward(layer, hidden, kwargs)

    def advance(self, layer: nn.Module) -> None:
        """Replace the inputs with `layer`'s outputs: the next layer's inputs, computed through
        `layer` as it is now (already quantized, in layer-by-layer compression)."""
        # In place, batch by batch: each input goes as its output arrives, so the pass holds
        # one batch more than the inputs rather than a second copy of them all.
        for index, (hidden, kwargs) in enumerate(zip(self.hidden, self.kwargs, strict=True)):
            self.hidden[index] = self._kept(self._forward(layer, hidden, kwargs))

    def _forward(self, layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        with autocast_to(hidden.device.type, self.compute_dtype):
            return run_layer(layer, hidden.float(), kwargs)

    def _kept(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.to(self.compute_dtype or torch.float32)


class PhaseClock:
    """Seconds spent in each named phase of a layer-by-layer pass: `lap(phase)` books the time
    since the previous lap (or since the clock started) to `phase`."""

    def __init__(self, *phases: str) -> None:
        self.seconds = dict.fromkeys(phases, 0.0)
        self._mark = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] += now - self._mark
        self._mark = now

    def rounded(self) -> dict[str, float]:
        return {name: round(value, 2) for name, value in self.seconds.items()}


def upcast(modules: Iterable[nn.Module]) -> None:
    """Cast the floating parameters and buffers `modules` own (not their children's) to
    float32 in place; parameters keep their identity, so tied weights stay tied. Exact for
    16-bit values. `upcast(layer.modules())` takes a whole layer."""
    replaced = []
    with torch.inference_mode(False):  # normal tensors: the model may be trained afterwards
        for module in modules:
            for param in module.parameters(recurse=False):
                if param.is_floating_point() and param.dtype != torch.float32:
                    replaced.append(param.data)
                    param.data = replaced[-1].float()
            for name, buffer in module.named_buffers(recurse=False):
                if buffer.is_floating_point() and buffer.dtype != torch.float32:
                    replaced.append(buffer)
                    setattr(module, name, buffer.float())
    # A checkpoint read by mmap keeps the 16-bit pages just read resident: give them back.
    drop_file_pages(replaced)


def outside_layers(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` outside its decoder layers (embeddings, final norm, head, rotary
    tables): what runs before layer 0 and after the last one."""
    inside = {id(m) for m in decoder_layers(model).modules()}
    return [m for m in model.modules() if id(m) not in inside]


def linear_children(layer: nn.Module) -> dict[str, nn.Linear]:
    """The layer's nn.Linear modules by dotted name, in forward (registration) order."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


@torch.inference_mode()
def capture_first_layer_inputs(
    model: nn.Module, windows: torch.Tensor, batch_size: int
) -> LayerInputs:
    """Run the embedding part of `model` on `windows` [n, L] and record layer 0's inputs,
    in float32: an input embedding left in 16 bits has its output cast (exactly) before
    anything else (rotary tables, positional embeddings) sees it."""
    layers = decoder_layers(model)
    captured = LayerInputs([], [])

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden.detach())
        captured.kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handles = [
        layers[0].register_forward_pre_hook(hook, with_kwargs=True),
        model.get_input_embeddings().register_forward_hook(lambda m, args, out: out.float()),
    ]
    try:
        for start in range(0, windows.shape[0], batch_size):
            with contextlib.suppress(_StopForward):
                model(input_ids=windows[start : start + batch_size], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """One decoder layer's output hidden states (layers return a tensor or a tuple)."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out
