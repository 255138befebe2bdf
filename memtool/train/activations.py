"""Activation memory for training: count, recompute and swap what autograd saves for backward.

`ActivationManager` wraps the forward pass of each micro-batch (`forward_context`) and routes every
tensor autograd saves through a `SavedTensorStore` (activation_swap.py): plain mode only counts
them; "full" recomputes each decoder layer in backward from its input; "tokens" is MEMO's
token-wise scheme (activation_recompute.py, arXiv 2407.12117); `swap` moves what is kept to host
memory. With `swap_fraction=None` in "tokens" mode, or with an `activation_budget_bytes`, the first
micro-batch is measured with nothing recomputed (everything swapped if swapping is allowed), and
the mode for the rest comes from `plan_activations` (activation_plan.py): plain autograd when it
fits the budget, else the configured recomputation, with MEMO's alpha when swapping.

Usage::

    manager = ActivationManager(model, ActivationConfig(recompute="tokens", swap=True))
    with manager.forward_context():
        loss = model(input_ids=ids, use_cache=False).loss
    loss.backward()
    manager.stats().peak_resident_bytes
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from memtool.errors import MemtoolError
from memtool.models.layers import decoder_layers
from memtool.train.activation_compress import COMPRESS_FORMATS
from memtool.train.activation_host import Stopwatch
from memtool.train.activation_plan import (
    ActivationPlan,
    ActivationProfile,
    plan_activations,
    plan_layer_fractions,
    plan_swap_fraction,
    swap_warning,
)
from memtool.train.activation_recompute import (
    checkpointed_forward,
    supports_tokenwise,
    tokenwise_forward,
)
from memtool.train.activation_swap import KEEP, SWAP, SavedTensorStore

__all__ = [
    "ActivationConfig",
    "ActivationManager",
    "ActivationStats",
    "find_decoder_layers",
    "plan_layer_fractions",
    "plan_swap_fraction",
]

logger = logging.getLogger(__name__)

RECOMPUTE_MODES = ("none", "full", "tokens")


@dataclass
class ActivationConfig:
    """How a training step stores the activations its backward needs.

    Attributes:
        recompute: "none"; "full" (recompute each decoder layer from its input); "tokens" (MEMO:
            layer input and attention output kept, other activations swapped for a fraction of
            the tokens and recomputed for the rest; Llama, Mistral and Qwen2 layers).
        swap: move kept activations to host memory. "tokens" without swap keeps the layer inputs
            and attention outputs on the device and recomputes everything else.
        swap_fraction: alpha in [0, 1] for "tokens" with swap; None: planned on the first
            micro-batch.
        activation_budget_bytes: device bytes for saved activations; None: no budget. With a
            budget the first micro-batch is measured and the cheapest mode that fits is used.
        compress: host storage of swapped activations, through `memtool.ops.pack_activation`:
            None (as is); "bf16" (float32 storages halved); "int8" (float32, float16 and
            bfloat16 storages as int8 with a float32 absmax scale per 256 elements: a quarter
            of float32 plus 1.6%; lossy, see activation_compress.py). Integer and bool storages are
            kept as they are.
        host_budget_bytes: host bytes for swapped activations when planning alpha; None: the
            memory available when the plan is made.
    """

    recompute: str = "none"
    swap: bool = False
    swap_fraction: float | None = None
    activation_budget_bytes: int | None = None
    compress: str | None = None
    host_budget_bytes: int | None = None

    def validate(self) -> None:
        """Raises MemtoolError naming the first bad or contradictory setting."""
        if self.recompute not in RECOMPUTE_MODES:
            raise MemtoolError(
                f"unknown recompute mode {self.recompute!r}: use none, full or tokens"
            )
        if self.swap_fraction is not None:
            if not 0.0 <= self.swap_fraction <= 1.0:
                raise MemtoolError(f"swap fraction {self.swap_fraction} is not in [0, 1]")
            if self.recompute != "tokens" or not self.swap:
                raise MemtoolError(
                    "a swap fraction (--swap-fraction) is MEMO's: it needs --recompute tokens "
                    f"(or none) and --swap-activations, not --recompute {self.recompute}"
                    if self.swap
                    else "a swap fraction (--swap-fraction) applies with --swap-activations"
                )
        for name in ("activation_budget_bytes", "host_budget_bytes"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise MemtoolError(f"{name} must be positive, not {value}")
        if self.compress not in COMPRESS_FORMATS:
            raise MemtoolError(
                f"unknown activation compression {self.compress!r}: use bf16 or int8"
            )
        if self.compress is not None and not self.swap:
            raise MemtoolError("activation compression applies to swapped activations: set swap")


@dataclass(frozen=True)
class ActivationStats:
    """Saved-activation memory since the last `reset_peak`, counted through saved-tensor hooks.

    Attributes:
        peak_resident_bytes: peak device bytes of activations saved for backward during the
            forward passes (storages deduplicated, parameters excluded, copies in flight included).
        backward_peak_resident_bytes: peak during backward: what is still kept, restored from the
            host, and the working set of recomputation.
        host_bytes_peak: peak host bytes of swapped activations (after compression).
        swapped_bytes: device bytes copied to the host (before compression).
        recomputed_tokens: tokens whose layer activations backward recomputed, summed over layers.
        swap_fraction: alpha of the last forward ("tokens"; the mean over layers when planned
            per layer); 1.0 or 0.0 for other modes with or without swapping.
        mode: the last forward's mode: plain, swap, full, full+swap, tokens or tokens+swap.
        layer_saved_bytes: per decoder layer, the saved bytes it added in the last forward
            (wherever they are stored).
        layer_swap_fractions: per decoder layer alpha ("tokens"); empty for other modes.
    """

    peak_resident_bytes: int
    backward_peak_resident_bytes: int
    host_bytes_peak: int
    swapped_bytes: int
    recomputed_tokens: int
    swap_fraction: float
    mode: str
    layer_saved_bytes: tuple[int, ...]
    layer_swap_fractions: tuple[float, ...] = ()


def find_decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of `model`, in order (`memtool.models.layers.decoder_layers`)."""
    return list(decoder_layers(model))


class ActivationManager:
    """Counts, recomputes and swaps saved activations of `model` as `config` says.

    Args:
        model: the model being trained; decoder layers are found by `find_decoder_layers`.
        config: an `ActivationConfig`.

    Raises:
        MemtoolError: a bad config, "tokens" on a layer it does not know, or transformers' own
            activation checkpointing left on.
    """

    def __init__(self, model: nn.Module, config: ActivationConfig) -> None:
        config.validate()
        self.model, self.config = model, config
        self.layers = find_decoder_layers(model)
        # Its checkpoint would hide each layer's saved tensors from the hooks (nothing counted,
        # nothing swapped) and recompute on top of ours.
        if any(getattr(layer, "gradient_checkpointing", False) for layer in self.layers):
            raise MemtoolError(
                "transformers' activation checkpointing is on; memtool's --recompute full "
                "replaces it: call model.activation_checkpointing_disable()"
            )
        if config.recompute == "tokens" and not supports_tokenwise(self.layers[0]):
            arch = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
            raise MemtoolError(
                f"recompute='tokens' knows Llama, Mistral and Qwen2 decoder layers, not {arch} "
                f"({type(self.layers[0]).__name__}); use --recompute full"
            )
        self._store = SavedTensorStore(config.compress)
        self._probing = config.activation_budget_bytes is not None or (
            config.recompute == "tokens" and config.swap and config.swap_fraction is None
        )
        tokens = config.recompute == "tokens"
        # A budget without swapping (and without "tokens"): measure with whole layers recomputed,
        # the lightest mode that needs no swapping, rather than as plain autograd, which would
        # overrun the budget on the first micro-batch. Each layer's saved bytes then show only as
        # backward recomputes it, so the plan is made when the next micro-batch starts. (Measured
        # so, a layer also counts the inputs its recomputation holds that plain autograd does not
        # save, such as int64 position ids: 8 bytes a token, erring towards more.)
        self._plan_after_backward = self._probing and not config.swap and not tokens
        self._plan_pending = False
        if self._plan_after_backward:
            self._plan = ActivationPlan("full", False)
        elif self._probing:
            # Measure with nothing recomputed; swap everything (if allowed) so that the first
            # micro-batch is as light on the device as the lightest mode.
            self._plan = ActivationPlan(config.recompute if tokens else "none", config.swap, 1.0)
        else:
            alpha = (config.swap_fraction if config.swap else 0.0) if tokens else None
            self._plan = ActivationPlan(config.recompute, config.swap, alpha, config.swap)
        self._last_plan = self._plan
        self._input_bytes: dict[int, int] = {}
        self._layer_clock: Stopwatch | None = None
        self._layer_clocks: dict[int, Stopwatch] = {}
        self._warned = False  # swap_warning, once per run
        self._cuda = any(p.is_cuda for p in itertools.islice(model.parameters(), 1))
        self._reprobed = False  # see _probe_again

    @contextlib.contextmanager
    def forward_context(self) -> Iterator[None]:
        """Wrap the forward pass(es) of one micro-batch; run its backward after leaving.

        Installs the saved-tensor hooks, the decoder-layer hooks and, for recomputation, the
        replacement layer forwards; all are removed on exit. After the first micro-batch of a
        measured run the plan for the following ones is made here.

        Raises:
            MemtoolError: (after a measured micro-batch) the budget is below one layer's working
                set, or nothing fits without the swapping the config forbids.
        """
        if self._plan_pending:  # the measured micro-batch's backward has run (see __init__)
            self._plan = self._make_plan()
            self._plan_pending = False
        plan, store = self._plan, self._store
        self._last_plan = plan
        store.begin_forward(_parameter_storages(self.model), timing=self._probing)
        self._layer_clock = Stopwatch() if self._probing else None
        self._layer_clocks = {}
        handles, undo = [], []
        try:
            for index, layer in enumerate(self.layers):
                handles.append(layer.register_forward_pre_hook(
                    functools.partial(self._enter, index), with_kwargs=True))  # fmt: skip
                handles.append(layer.register_forward_hook(
                    functools.partial(self._leave, index, plan.prefetch)))  # fmt: skip
                if plan.recompute != "none":
                    undo.append(_patch_forward(layer, store, plan, index))
            with store.saving(SWAP if plan.swap else KEEP):
                yield
        finally:
            for handle in handles:
                handle.remove()
            for restore in undo:
                restore()
            store.layer = None
        if self._probing and self._probe_again():
            self._reprobed = True
        elif self._probing and self._plan_after_backward:
            self._plan_pending = True
            self._probing = False
        elif self._probing:
            self._plan = self._make_plan()  # raises on an impossible budget: probe again next time
            self._probing = False

    def _probe_again(self) -> bool:
        """On CUDA a copy into pageable memory blocks the host until it ends, so a measured
        micro-batch whose copies spilled out of the (then still small) pinned slab times the
        copies as layer compute: the plan would think they hide (measured on an H200: alpha 1.0
        and a 2.2x step). The slab grows between micro-batches: measure once more then. (On CPU
        every copy is synchronous and timed apart from the layers.)"""
        slab = self._store.slab
        spilled = slab.high_water > slab.buffer.numel()
        return self._cuda and spilled and not self._reprobed

    def stats(self) -> ActivationStats:
        """Saved-activation memory since the last `reset_peak`."""
        s, plan = self._store, self._last_plan
        alpha = plan.swap_fraction if plan.recompute == "tokens" else float(plan.swap)
        return ActivationStats(
            peak_resident_bytes=s.forward_peak,
            backward_peak_resident_bytes=s.backward_peak,
            host_bytes_peak=s.host_peak,
            swapped_bytes=s.swapped_bytes,
            recomputed_tokens=s.recomputed_tokens,
            swap_fraction=alpha,
            mode=plan.mode,
            layer_saved_bytes=tuple(s.layer_bytes.get(i, 0) for i in range(len(self.layers))),
            layer_swap_fractions=tuple(plan.fraction(i) for i in range(len(self.layers)))
            if plan.recompute == "tokens"
            else (),
        )

    def reset_peak(self) -> None:
        """Restart the peaks from what is held now and zero the swapped/recomputed counters."""
        self._store.reset_peaks()

    def _enter(self, index: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._store.layer = index
        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hidden, Tensor):
            self._input_bytes[index] = hidden.nbytes
        if self._layer_clock is not None:
            self._layer_clock.start(_stream_of(hidden))
            self._layer_clocks.setdefault(index, Stopwatch()).start(_stream_of(hidden))

    def _leave(self, index: int, prefetch: bool, module: nn.Module, args: tuple, output) -> None:
        self._store.layer = None
        first = output[0] if isinstance(output, tuple) else output
        if self._layer_clock is not None:
            self._layer_clock.stop(_stream_of(first))
            self._layer_clocks[index].stop(_stream_of(first))
        # The gradient reaching layer i's output starts its backward: restore layer i-1 meanwhile.
        cuda_graph = isinstance(first, Tensor) and first.is_cuda and first.requires_grad
        if prefetch and index > 0 and cuda_graph:
            first.register_hook(functools.partial(self._prefetch, index - 1))

    def _prefetch(self, layer: int, grad: Tensor) -> None:
        self._store.prefetch(layer)

    def _make_plan(self) -> ActivationPlan:
        store, n = self._store, len(self.layers)
        layer_s = self._layer_clock.seconds()
        copy_s = store.copy_clock.seconds() if store.copy_clock is not None else 0.0
        times = [self._layer_clocks[i].seconds() if i in self._layer_clocks else 0.0
                 for i in range(n)]  # fmt: skip
        if not self._cuda:
            # Synchronous copies ran inside the layers: take them out of the compute time.
            layer_s = max(layer_s - copy_s, 0.0)
            clocks = store.layer_copy_clocks
            times = [max(t - clocks[i].seconds(), 0.0) if i in clocks else t
                     for i, t in enumerate(times)]  # fmt: skip
        bandwidth = store.copied_bytes / copy_s if copy_s > 0 else None
        # Under recomputation a layer's forward saves its inputs, its backward the rest.
        recomputed = store.recomputed_layer_bytes
        profile = ActivationProfile(
            layer_saved_bytes=tuple(
                store.layer_bytes.get(i, 0) + recomputed.get(i, 0) for i in range(n)
            ),
            layer_input_bytes=tuple(self._input_bytes.get(i, 0) for i in range(n)),
            layer_always_bytes=tuple(store.layer_always.get(i, 0) for i in range(n)),
            outside_bytes=store.layer_bytes.get(None, 0),
            layer_time_s=layer_s / n,
            host_bandwidth_bytes_per_s=bandwidth,
            layer_times_s=tuple(times),
        )
        c = self.config
        host_budget = c.host_budget_bytes or _available_host_bytes()
        plan = plan_activations(
            profile, c.recompute, c.swap, c.swap_fraction, c.activation_budget_bytes, host_budget
        )
        logger.info(
            "activations: plain %d bytes, one layer %d; mode %s, swap fraction %s (per layer %s)",
            profile.plain_bytes, profile.minimum_bytes, plan.mode, plan.swap_fraction,
            plan.layer_fractions,
        )  # fmt: skip
        warning = swap_warning(profile, plan)
        if warning and not self._warned:
            self._warned = True
            logger.warning(warning)
        return plan


def _patch_forward(layer: nn.Module, store: SavedTensorStore, plan: ActivationPlan, index: int):
    """Replace `layer.forward` for recomputation; returns the function that undoes it."""
    had_own = "forward" in layer.__dict__
    previous = layer.forward
    if plan.recompute == "full":
        layer.forward = functools.partial(checkpointed_forward, store, previous)
    else:
        layer.forward = functools.partial(
            tokenwise_forward, store, layer, previous, plan.fraction(index)
        )

    def undo() -> None:
        if had_own:
            layer.forward = previous
        else:
            del layer.forward

    return undo


def _parameter_storages(model: nn.Module) -> set[int]:
    """Storages of plain parameters and buffers (frozen weights are not activations either)."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    return {id(t.untyped_storage()) for t in tensors if type(t.data) is Tensor and not t.is_meta}


def _stream_of(t: object) -> torch.cuda.Stream | None:
    if isinstance(t, Tensor) and t.is_cuda:
        return torch.cuda.current_stream(t.device)
    return None


def _available_host_bytes() -> int:
    """MemAvailable on Linux; else free physical pages."""
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
