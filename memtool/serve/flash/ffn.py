"""The FFN of one decoder layer, computed from neuron bundles streamed into its window.

It stands in for a Llama-family `mlp` (SwiGLU) or, in an OPT layer, for `fc1` with
`activation_fn` and `fc2` turned into identities (OPT's layer calls them in turn on a flattened
[N, H] input, so the whole FFN may as well happen in the first). Per call:

1. selection gives each token's neurons (`LayerSelector.mask`);
2. their union is made resident in the layer's `NeuronWindow` (hits stay, misses are read);
   when the misses do not fit even after evicting every row the call does not use (a long
   prompt, or a window smaller than one token's neurons on a tight budget), they are computed
   straight from the reader's staging buffer span by span instead, and as many as there are
   free rows are kept in the window;
3. the FFN is computed over the window's rows (and streamed spans) with each token's own mask
   applied, so neurons present only for the window, or read through a gap, never change the
   result: the output equals the dense FFN with the same neuron mask
   (`memtool.serve.flash.reference`).

Lookahead (one token at a time): before the decoder layer's attention runs, `lookahead` applies
the layer's selector to the layer's input through the FFN's own norm, and starts reading the
guessed neurons the window lacks (`NeuronReader.prefetch`), so the disk works while attention
computes. The residual stream changes little across one attention block, which is the
"lookahead" of Deja Vu (Liu et al. 2023): on the default model at sparsity 0.5 the guess holds
87% of the neurons selected afterwards, plus 15% more. Step 2 then takes the prefetched
bundles it needs and reads only the rest; a wrong guess costs bytes read, never the result.
"""

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from memtool.ops.cpu import cpu_kernel_status
from memtool.serve.flash.io import NeuronReader
from memtool.serve.flash.sparsity import LayerSelector
from memtool.serve.flash.window import NeuronWindow


@dataclass
class FlashCounters:
    """Counters shared by every layer of one model; the engine diffs them per token."""

    neurons_active: int = 0  # neurons selected (union over the call's tokens), all layers
    neurons_loaded: int = 0  # of those, read from storage
    neurons_hit: int = 0  # of those, already in the window
    neurons_prefetched: int = 0  # of the loaded ones, read ahead by the lookahead
    memory_seconds: float = 0.0  # window bookkeeping and copies (reads excluded)

    def snapshot(self) -> "FlashCounters":
        return FlashCounters(**vars(self))


class FlashFFN(nn.Module):
    """One layer's streamed FFN.

    Args:
        layer_meta: the store's entry for this layer (offset, stride, layout).
        kind: "swiglu" or "relu".
        act: the layer's activation (SiLU for SwiGLU, ReLU for OPT).
        selector: neuron selection for this layer.
        window: the layer's neuron cache.
        reader: the store's reader.
        counters: the model's shared counters.
        out_bias: down_proj / fc2 bias (per output feature, so resident), or None.
    """

    def __init__(
        self,
        layer_meta: dict,
        kind: str,
        act: nn.Module,
        selector: LayerSelector,
        window: NeuronWindow,
        reader: NeuronReader,
        counters: FlashCounters,
        out_bias: Tensor | None,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.act = act
        self.selector = selector
        self.window = window
        self.reader = reader
        self.counters = counters
        self.out_bias = out_bias
        self._offset = layer_meta["offset"]
        self._stride = layer_meta["stride_bytes"]
        itemsize = window.buffer.element_size()
        self._parts = {
            p["name"]: (p["offset_bytes"] // itemsize, p["numel"]) for p in layer_meta["layout"]
        }
        self.position = 0  # tokens seen so far: the window's clock
        # When a list: each call appends the neuron mask it applied, [tokens, n_neurons] bool
        # (ReLU: the predicted neurons, whose ReLU then zeroes the rest, as in the dense FFN).
        self.recorded: list[Tensor] | None = None
        self._applied: Tensor | None = None
        # One token on CPU: the native bundle kernel (`bundle_ffn`) where it builds and the
        # activation is the one it implements; False forces the torch code (its specification).
        self.native: bool | None = None
        # The FFN's input norm applied to the decoder layer's input, for `lookahead`; None
        # turns the lookahead off.
        self.lookahead_norm: nn.Module | None = None

    def lookahead(self, hidden: Tensor) -> None:
        """Guess the coming token's neurons from the decoder layer's input `hidden` (before
        its attention) and start reading the ones the window lacks (module doc). Only for a
        single token: a prompt's union of neurons is most of the layer."""
        if self.lookahead_norm is None or hidden.shape[:-1].numel() != 1:
            return
        x = self.lookahead_norm(hidden.reshape(1, -1))
        ids = torch.nonzero(self.selector.mask(x)[0][0]).flatten()
        ids = ids[~self.window.kept(ids, self.position)]
        self.reader.prefetch(self._offset, self._stride, ids)

    def _read(self, ids: Tensor) -> Tensor:
        return self.reader.read_bundles(self._offset, self._stride, ids)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        mask, gate_all = self.selector.mask(x)
        ids = torch.nonzero(mask.any(dim=0)).flatten()
        position = self.position + x.shape[0] - 1
        self.position += x.shape[0]
        window, counters = self.window, self.counters
        counters.neurons_active += ids.numel()
        if self.recorded is not None:
            self._applied = torch.zeros_like(mask)
        began, io_before = time.perf_counter(), self.reader.stats.seconds
        window.evict_stale(position)
        misses = window.lookup(ids, position)
        counters.neurons_hit += ids.numel() - misses.numel()
        counters.neurons_loaded += misses.numel()
        # The lookahead's bundles (none unless it ran for this layer), then what they lack.
        ahead = self.reader.take_prefetch(self._offset)
        rest = misses
        if ahead:
            read_ahead = torch.cat([neurons for neurons, _ in ahead])
            rest = misses[~torch.isin(misses, read_ahead)]
            counters.neurons_prefetched += misses.numel() - rest.numel()
        fits = window.make_room(misses.numel(), position)
        stream = None
        if fits:
            for neurons, block in ahead:
                take = torch.isin(neurons, misses)
                window.insert(neurons[take], block[take], position)
            if rest.numel():
                window.insert(rest, self._read(rest), position)
        else:  # issued now, so the reads run while the window's rows are computed
            stream = self.reader.stream(
                self._offset, self._stride, rest, first_half=int(bool(ahead))
            )
        counters.memory_seconds += self._since(began, io_before)
        out = self._compute(x, mask, gate_all, window.buffer[: window.n_used], window.neurons())
        if stream is not None:
            out += self._stream(x, mask, gate_all, misses, position, ahead, stream)
        if self.out_bias is not None:
            out += self.out_bias
        if self.recorded is not None:
            self.recorded.append(self._applied)
        return out.reshape(shape)

    def _since(self, began: float, io_before: float) -> float:
        """Seconds since `began`, less the reads' share (counted as I/O)."""
        return time.perf_counter() - began - (self.reader.stats.seconds - io_before)

    def _stream(
        self,
        x: Tensor,
        mask: Tensor,
        gate_all: Tensor | None,
        misses: Tensor,
        position: int,
        ahead: list[tuple[Tensor, Tensor]],
        stream: Iterator[tuple[Tensor, Tensor]],
    ) -> Tensor:
        """More neurons than the window holds: compute them straight from the reader's staging
        buffer, load by load (the lookahead's first, then `stream`'s), and keep what fits in
        the window's free rows for later tokens."""
        out = torch.zeros_like(x)
        window, dtype = self.window, self.window.buffer.dtype
        # Loads hold gap bundles, and a gap may hold a neuron the window already computed or
        # (after a lookahead) one an earlier load did: each miss counts once, from the first
        # load that holds it, and only misses may enter the window.
        todo = torch.zeros(mask.shape[1], dtype=torch.bool)
        todo[misses] = True
        for neurons, block in itertools.chain(ahead, stream):
            began, io_before = time.perf_counter(), self.reader.stats.seconds
            fresh = todo[neurons]
            if not bool(fresh.any()):
                continue
            bundles = block.view(dtype)
            free = window.capacity - window.n_used
            if free > 0:
                keep = torch.nonzero(fresh).flatten()[:free]
                window.insert(neurons[keep], block[keep], position)
            self.counters.memory_seconds += self._since(began, io_before)
            out += self._compute(x, mask & todo, gate_all, bundles, neurons)
            todo[neurons] = False
        return out

    def _compute(
        self, x: Tensor, mask: Tensor, gate_all: Tensor | None, bundles: Tensor, neurons: Tensor
    ) -> Tensor:
        """The FFN over `bundles` (rows of neurons `neurons`), each token's mask applied."""
        keep = mask[:, neurons]
        one = x.shape[0] == 1 and gate_all is None and self._applied is None
        if one and self._native(bundles, x.shape[1]):
            return self._compute_native(x, keep[0], bundles)

        def part(name: str) -> Tensor:
            start, numel = self._parts[name]
            return bundles[:, start : start + numel]

        if self.kind == "relu":
            if gate_all is not None:  # fc1 resident: the pre-activations came with selection
                h = gate_all[:, neurons]
            else:
                h = nn.functional.linear(x, part("fc1"))
                if "fc1_bias" in self._parts:
                    h = h + part("fc1_bias")[:, 0]
            self._record(neurons, keep)
            return _down(self.act(h) * keep, part("fc2"))
        if gate_all is not None:  # "cats": the exact gate was computed for selection
            gate = gate_all[:, neurons]
        else:
            gate = nn.functional.linear(x, part("gate"))
            if "gate_bias" in self._parts:
                gate = gate + part("gate_bias")[:, 0]
        up = nn.functional.linear(x, part("up"))
        if "up_bias" in self._parts:
            up = up + part("up_bias")[:, 0]
        act = self.act(gate)
        if self.selector.cats_threshold is not None:
            keep = keep & (act.abs() > self.selector.cats_threshold)
        self._record(neurons, keep)
        return _down(act * up * keep, part("down"))

    def _native(self, bundles: Tensor, hidden: int) -> bool:
        if self.native is None:
            # The kernel takes every weight part to be one row of the FFN's input width.
            rows = [n for name, (_, n) in self._parts.items() if not name.endswith("_bias")]
            same = all(n == hidden for n in rows)
            self.native = self._kernel_activation() and same and cpu_kernel_status()[0]
        return self.native and bundles.device.type == "cpu" and bundles.stride(1) == 1

    def _kernel_activation(self) -> bool:
        """Whether the layer's activation is the one the kernel computes (ReLU or SiLU), by what
        it does: transformers' Llama layers hold its own `SiLUActivation`, not `nn.SiLU`."""
        probe = torch.linspace(-8, 8, 65)
        want = torch.relu(probe) if self.kind == "relu" else nn.functional.silu(probe)
        with torch.no_grad():
            return torch.equal(self.act(probe), want)

    def _compute_native(self, x: Tensor, keep: Tensor, bundles: Tensor) -> Tensor:
        """`_compute` for one token in one pass over the kept bundles (memtool/ops/cpu/
        bundle_ffn.cpp): float32 sums, so equal to the torch code up to rounding."""
        parts = self._parts
        relu = self.kind == "relu"
        first, second, down = ("fc1", "", "fc2") if relu else ("gate", "up", "down")
        threshold = self.selector.cats_threshold
        out = torch.ops.memtool_cpu.bundle_ffn(
            x[0].float().contiguous(),
            bundles,
            keep.contiguous(),
            0 if relu else 1,
            parts[first][0],
            -1 if relu else parts[second][0],
            parts[down][0],
            parts.get(f"{first}_bias", (-1,))[0],
            -1 if relu else parts.get(f"{second}_bias", (-1,))[0],
            -1.0 if threshold is None else float(threshold),
        )
        return out.to(x.dtype)[None]

    def _record(self, neurons: Tensor, keep: Tensor) -> None:
        if self._applied is not None:
            self._applied[:, neurons] |= keep


def _down(hidden: Tensor, rows: Tensor) -> Tensor:
    """`hidden @ rows` for the down projection's rows (a strided view into the bundles).

    One token: `mv` over the transposed view, which BLAS takes as is; torch's bf16 `[1, n] @
    [n, H]` on a strided view is about 10x slower on CPU (1.5 ms against 0.14 ms at n=1170).
    """
    if hidden.shape[0] == 1:
        return torch.mv(rows.T, hidden[0])[None]
    return hidden @ rows
