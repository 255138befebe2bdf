"""The saved-tensor store: counts, keeps or swaps to host the tensors autograd saves for backward.

`torch.autograd.graph.saved_tensors_hooks` hands every tensor a forward op saves to
`SavedTensorStore.pack`, which returns a holder; autograd keeps the holder until that op's backward
has run and then drops it. Bytes are counted per storage (a view and its base are one entry) from
the first holder to the release of the last, so the numbers are what the device holds, not a sum of
tensor sizes. Parameters are autograd's own business: leaves that require grad (FSDP2's unsharded
parameters included), their views, and tensors sharing storage with the model's parameters or
buffers pass through uncounted and unswapped.

Swapping copies an entry's whole storage to host memory and drops the device copy; the first
unpack restores it, and every holder of the storage shares the restored copy until the last one
goes. Host memory comes from a preallocated `HostSlab` (activation_host.py, pinned on CUDA). On
CUDA the copies run on two side streams (one each way) ordered by events, so device-to-host copies
overlap the forward and a layer's restores can start while the next layer runs backward
(`prefetch`), without queueing behind copies still going out. On CPU the copies
are synchronous memcpys into the slab, which keeps the device/host accounting exact and testable.

`compress` keeps swapped float storages packed on the host by `memtool.ops.pack_activation`
("bf16", or "int8" with a scale per 256 elements; formats and layout in activation_compress.py):
packed on the compute stream before the copy out, unpacked there after the copy back. Host bytes
count the packed size exactly. A storage that int8 cannot represent (inf in a row) stays on the
device, exact, once its copy shows it (`_copied_out`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from memtool.errors import MemtoolError
from memtool.ops import Packed
from memtool.train.activation_compress import (
    COMPRESS_FORMATS,
    host_scales,
    host_views,
    pack_storage,
    staged,
    staged_nbytes,
    storage_format,
    unpack_storage,
)
from memtool.train.activation_host import HostSlab, Stopwatch

KEEP, SWAP = "keep", "swap"
# Profile categories: MEMO always swaps the layer input and the attention core's outputs; the rest
# ("fraction") is swapped for a fraction of the tokens and recomputed for the others.
ALWAYS, FRACTION = "always", "fraction"
OUT, IN = "out", "in"  # copy directions, each on its own CUDA stream

logger = logging.getLogger(__name__)


class _Entry:
    """One storage's saved bytes: kept on the device, or on the host and maybe restored."""

    __slots__ = (
        "device", "dtype", "flat", "fmt", "host", "host_in_slab", "in_event", "keys", "layer",
        "nbytes", "numel", "out_event", "packed", "refs", "refs_to", "resident",
    )  # fmt: skip

    def __init__(self, device: torch.device, nbytes: int, layer: int | None) -> None:
        self.device, self.nbytes, self.layer = device, nbytes, layer
        self.refs = 0
        self.keys: list[int] = []
        self.refs_to: list[tuple[weakref.ref, int | None]] = []
        self.resident = False
        self.dtype, self.numel = torch.uint8, 0
        self.fmt: str | None = None  # compression of the host copy: None, "bf16" or "int8"
        self.host: Tensor | None = None
        self.host_in_slab = False
        # Device copy of a swapped entry: in flight, restored, or kept (int8 could not hold it).
        self.flat: Tensor | None = None
        # Compressed entries, on the device: packed parts copying out, or copied in to unpack.
        self.packed: list[Packed] | None = None
        self.out_event = self.in_event = None

    def holds(self, storage: torch.UntypedStorage, version: int) -> bool:
        # A swapped storage written in place after its copy is a new value: never share that
        # copy (recorded version None: nothing to compare, kept entries hold the live tensor).
        return any(ref() is storage and v in (None, version) for ref, v in self.refs_to)


class _Holder:
    __slots__ = ("entry", "store")

    def __init__(self, store: SavedTensorStore, entry: _Entry) -> None:
        self.store, self.entry = store, entry

    def __del__(self) -> None:
        self.store._drop(self.entry)


class _Kept(_Holder):
    __slots__ = ("tensor",)

    def __init__(self, store: SavedTensorStore, entry: _Entry, tensor: Tensor) -> None:
        super().__init__(store, entry)
        self.tensor = tensor

    def unpack(self) -> Tensor:
        return self.tensor


class _Swapped(_Holder):
    __slots__ = ("dtype", "offset", "size", "stride")

    def __init__(self, store: SavedTensorStore, entry: _Entry, t: Tensor) -> None:
        super().__init__(store, entry)
        self.dtype, self.size, self.stride, self.offset = (
            t.dtype, t.size(), t.stride(), t.storage_offset()
        )  # fmt: skip

    def unpack(self) -> Tensor:
        storage = self.store._restore(self.entry).untyped_storage()
        view = torch.empty(0, dtype=self.dtype, device=self.entry.device)
        return view.set_(storage, self.offset, self.size, self.stride)


class _Split:
    """A tensor saved as a swapped head plus a tail recomputed on demand (MEMO's token split)."""

    __slots__ = ("head", "join", "tail")

    def __init__(self, head: object | None, tail: Callable[[], Tensor] | None, join: Callable):
        self.head, self.tail, self.join = head, tail, join

    def unpack(self, store: SavedTensorStore) -> Tensor:
        parts = [] if self.head is None else [store.unpack(self.head)]
        if self.tail is not None:
            parts.append(self.tail())
        return parts[0] if len(parts) == 1 else self.join(parts)


class SavedTensorStore:
    """Pack/unpack hooks with exact accounting of device-resident and host activation bytes.

    Args:
        compress: None; "bf16" to keep swapped float32 storages as bfloat16 on the host; "int8"
            for float32/float16/bfloat16 storages as int8 with a scale per 256 elements.
    """

    def __init__(self, compress: str | None = None) -> None:
        if compress not in COMPRESS_FORMATS:
            raise MemtoolError(f"unknown activation compression {compress!r}: use bf16 or int8")
        self.compress = compress
        self.policy = KEEP
        self.layer: int | None = None
        self._category = FRACTION
        self._always: set[int] = set()
        self._splits: dict[int, tuple[Tensor, _Split]] = {}
        self._entries: dict[int, _Entry] = {}
        self._param_storages: set[int] = set()
        self._by_layer: dict[int, list[_Entry]] = {}
        self._pending: list[_Entry] = []
        self._streams: dict[tuple[torch.device, str], torch.cuda.Stream] = {}
        self._lock = threading.RLock()
        self._recomputing = 0
        self._logged_nonfinite = False
        self.slab = HostSlab()
        self.resident_bytes = self.host_bytes = 0
        self.reset_peaks()
        self.begin_forward(set(), timing=False)

    def reset_peaks(self) -> None:
        """Restart the peaks from the current values and zero the cumulative counters."""
        self.forward_peak = self.backward_peak = self.resident_bytes
        self.host_peak = self.host_bytes
        self.swapped_bytes = self.recomputed_tokens = 0

    def begin_forward(self, param_storages: set[int], timing: bool) -> None:
        """Start a micro-batch: reset the per-forward profile, grow the slab if it is idle."""
        self._param_storages = param_storages
        self.layer_bytes: dict[int | None, int] = {}
        self.layer_always: dict[int | None, int] = {}
        # Per layer, what backward's recomputation saved (the last micro-batch's): a layer run
        # whole under recomputation shows its saved bytes only there.
        self.recomputed_layer_bytes: dict[int | None, int] = {}
        self.copy_clock = Stopwatch() if timing else None
        # Per decoder layer (None: outside the layers), for per-layer compute times on CPU.
        self.layer_copy_clocks: dict[int | None, Stopwatch] = {}
        self.copied_bytes = 0
        with self._lock:
            self._by_layer.clear()
            self._poll()
            self.slab.grow_if_idle()

    @contextlib.contextmanager
    def saving(self, policy: str) -> Iterator[None]:
        """Route saved tensors through this store, kept (KEEP) or swapped (SWAP)."""
        previous, self.policy = self.policy, policy
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                yield
        finally:
            self.policy = previous

    @contextlib.contextmanager
    def recomputing(self) -> Iterator[None]:
        """Backward recomputation: kept on the device, counted in the backward peak."""
        self._recomputing += 1
        try:
            with self.saving(KEEP):
                yield
        finally:
            self._recomputing -= 1

    @contextlib.contextmanager
    def category(self, category: str, *tensors: Tensor) -> Iterator[None]:
        """Attribute new entries (or, given tensors, those of their storages) to `category`."""
        if not tensors:
            previous, self._category = self._category, category
            try:
                yield
            finally:
                self._category = previous
            return
        keys = {id(t.untyped_storage()) for t in tensors} - self._always
        self._always |= keys
        try:
            yield
        finally:
            self._always -= keys

    @contextlib.contextmanager
    def splitting(self, splits: list[tuple[Tensor, Tensor | None, Callable | None]], join):
        """Save each `(tensor, head, tail)` as `head` (swapped) plus `tail()` (recomputed), put
        back together by `join([head, tail])`."""
        self._splits = {id(t): (t, _Split(head, tail, join)) for t, head, tail in splits}
        try:
            yield
        finally:
            self._splits = {}

    def pack(self, tensor: Tensor) -> object:
        """The pack hook: a holder that keeps, swaps or splits `tensor`."""
        found = self._splits.get(id(tensor))
        if found is None or found[0] is not tensor:
            return self._pack(tensor, None)
        split = found[1]
        head = None if split.head is None else self._pack(split.head, FRACTION)
        return _Split(head, split.tail, split.join) if split.tail is not None else head

    def unpack(self, holder: object) -> Tensor:
        """The unpack hook: the saved tensor, on its device."""
        if isinstance(holder, Tensor):
            return holder
        if isinstance(holder, _Split):
            return holder.unpack(self)
        return holder.unpack()

    def prefetch(self, layer: int) -> None:
        """Start restoring `layer`'s swapped CUDA storages (the next backward needs them)."""
        with self._lock:
            for entry in self._by_layer.pop(layer, []):
                idle = entry.flat is None and entry.packed is None
                if entry.refs and idle and entry.device.type == "cuda":
                    self._copy_in(entry)

    def _is_parameter(self, t: Tensor) -> bool:
        base = t if t._base is None else t._base
        if base.is_leaf and base.requires_grad:
            return True
        return type(t) is Tensor and id(t.untyped_storage()) in self._param_storages

    def _pack(self, t: Tensor, category: str | None) -> object:
        # Tensor subclasses (DTensor, float8 wrappers) have no single storage to count or copy.
        if self._is_parameter(t) or type(t) is not Tensor or t.layout != torch.strided:
            return t
        storage = t.untyped_storage()
        with self._lock:
            self._poll()
            entry = self._entries.get(id(storage))
            if entry is None or not entry.holds(storage, t._version):
                entry = self._new_entry(t, storage, category)
            entry.refs += 1
        if entry.host is None:
            return _Kept(self, entry, t.detach())
        return _Swapped(self, entry, t)

    def _new_entry(self, t: Tensor, storage: torch.UntypedStorage, category: str | None) -> _Entry:
        entry = _Entry(t.device, storage.nbytes(), self.layer)
        swap = self.policy == SWAP and not self._recomputing
        self._register(entry, storage, t._version if swap else None)
        self._set_resident(entry, True, backward=self._recomputing > 0)
        if self._recomputing:
            counted = self.recomputed_layer_bytes
            counted[self.layer] = counted.get(self.layer, 0) + entry.nbytes
            return entry
        if category is None:
            category = ALWAYS if id(storage) in self._always else self._category
        self.layer_bytes[self.layer] = self.layer_bytes.get(self.layer, 0) + entry.nbytes
        if category == ALWAYS:
            self.layer_always[self.layer] = self.layer_always.get(self.layer, 0) + entry.nbytes
        if swap:
            self._copy_out(entry, t, storage)
        return entry

    def _register(self, entry: _Entry, storage: torch.UntypedStorage, version: int | None) -> None:
        self._entries[id(storage)] = entry
        entry.keys.append(id(storage))
        entry.refs_to.append((weakref.ref(storage), version))

    def _set_resident(self, entry: _Entry, resident: bool, backward: bool = False) -> None:
        if entry.resident == resident:
            return
        entry.resident = resident
        self.resident_bytes += entry.nbytes if resident else -entry.nbytes
        if resident and backward:
            self.backward_peak = max(self.backward_peak, self.resident_bytes)
        elif resident:
            self.forward_peak = max(self.forward_peak, self.resident_bytes)

    def _copy_out(self, entry: _Entry, t: Tensor, storage: torch.UntypedStorage) -> None:
        dtype = t.dtype if entry.nbytes % t.element_size() == 0 else torch.uint8
        flat = torch.empty(0, dtype=dtype, device=t.device)
        flat.set_(storage, 0, (entry.nbytes // dtype.itemsize,), (1,))
        entry.dtype, entry.numel = dtype, flat.numel()
        entry.fmt = storage_format(self.compress, dtype, flat.numel())
        clock = self.copy_clock
        layer_clock = None
        if clock is not None and not flat.is_cuda:
            clock.start()  # synchronous on CPU: packing is swap time, not layer compute
            layer_clock = self.layer_copy_clocks.setdefault(self.layer, Stopwatch())
            layer_clock.start()
        # On CUDA, packing runs here on the compute stream, before the copy, rather than on the
        # copy stream after waiting: the kernel reads the storage in stream order, so no later
        # in-place write can reach the host copy, and the packed buffers belong to the compute
        # stream's pool like every other activation (the copy stream only reads them, covered by
        # record_stream). The cost is one memory-bound pass on the compute stream, small beside
        # the host transfer it shrinks.
        parts = None if entry.fmt is None else pack_storage(flat, entry.fmt)
        nbytes = entry.nbytes if parts is None else sum(p.nbytes for p in parts)
        raw, entry.host_in_slab = self.slab.alloc(nbytes, flat.is_cuda)
        if parts is None:
            entry.host = raw.view(dtype)
            copies = [(entry.host, flat)]
        else:
            entry.host = raw
            copies = host_views(raw, parts)
        self.host_bytes += raw.numel()
        self.host_peak = max(self.host_peak, self.host_bytes)
        self.swapped_bytes += entry.nbytes
        # Device bytes, compressed or not: the measured bandwidth is in the units the plan counts.
        self.copied_bytes += entry.nbytes
        if entry.layer is not None:
            self._by_layer.setdefault(entry.layer, []).append(entry)
        # Until the copy ends the store holds the storage and its packed copy: the storage stays
        # if int8 cannot represent it (`_copied_out`), and a restore in the meantime unpacks the
        # packed copy, the values the host will hold.
        entry.flat, entry.packed = flat, parts
        if not flat.is_cuda:
            for host, source in copies:
                host.copy_(source)
            if clock is not None:
                clock.stop()
                layer_clock.stop()
            self._copied_out(entry)
            return
        stream = self._stream(flat.device, OUT)
        stream.wait_stream(torch.cuda.current_stream(flat.device))
        with torch.cuda.stream(stream):
            if clock is not None:
                clock.start(stream)
            for host, source in copies:
                host.copy_(source, non_blocking=True)
            if clock is not None:
                clock.stop(stream)
            entry.out_event = torch.cuda.Event()
            entry.out_event.record(stream)
        # The allocator must not hand this memory out again before the copy has read it.
        for _, source in copies:
            source.record_stream(stream)
        self._pending.append(entry)

    def _copied_out(self, entry: _Entry) -> None:
        """A finished device-to-host copy: drop the device copy, unless int8 lost the storage."""
        if entry.fmt == "int8" and not torch.isfinite(host_scales(entry.host, entry.numel)).all():
            # A row holding inf has no absmax scale (memory-efficient attention pads its saved
            # logsumexp with inf): the storage stays on the device, exact, as if kept. The scales
            # are read from the host copy, so deciding this never waits for the device.
            nbytes = entry.host.numel()
            self.slab.free(nbytes, entry.host_in_slab)
            self.host_bytes -= nbytes
            entry.host = entry.packed = entry.fmt = None
            if not self._logged_nonfinite:
                self._logged_nonfinite = True
                logger.info(
                    "activation swap: saved storages holding inf stay on the device "
                    "(int8 cannot represent them)"
                )
            return
        entry.flat = entry.packed = None
        self._set_resident(entry, False)

    def _poll(self) -> None:
        """Finish the device-to-host copies that have ended.

        A device's copies out run in order on one stream, so the first unfinished one there
        means the later ones are unfinished too: querying each pending copy on every saved
        tensor cost the host time quadratic in the copies in flight (on an H200, ~0.4 ms a
        saved tensor with a hundred pending, which left the device idle between kernels)."""
        still = []
        busy: set[torch.device] = set()
        for entry in self._pending:
            if entry.refs == 0 or entry.out_event is None:
                continue
            if entry.device not in busy and entry.out_event.query():
                entry.out_event = None
                self._copied_out(entry)
            else:
                busy.add(entry.device)
                still.append(entry)
        self._pending = still

    def _restore(self, entry: _Entry) -> Tensor:
        with self._lock:
            if entry.flat is None and entry.packed is None:
                self._copy_in(entry)
            # Still copying out: keep the device copy rather than fetch it back.
            entry.out_event = None
            self._poll()
            if entry.packed is not None:
                self._unpack_device(entry)
            flat = entry.flat
        if entry.in_event is not None:
            torch.cuda.current_stream(flat.device).wait_event(entry.in_event)
        return flat

    def _copy_in(self, entry: _Entry) -> None:
        if entry.fmt is None:
            buffer = torch.empty(entry.numel, dtype=entry.dtype, device=entry.device)
            target, padding = buffer, None
        else:
            nbytes = staged_nbytes(entry.fmt, entry.numel)
            buffer = torch.empty(nbytes, dtype=torch.uint8, device=entry.device)
            target, padding = buffer[: entry.host.numel()], buffer[entry.host.numel() :]
            # int8's short last row is padded to a whole row; zeros keep the padding defined.
            padding = padding if padding.numel() else None
        if buffer.is_cuda:
            stream = self._stream(buffer.device, IN)
            # The new block belongs to the compute stream; the copy may only start once it is free.
            stream.wait_stream(torch.cuda.current_stream(buffer.device))
            with torch.cuda.stream(stream):
                target.copy_(entry.host, non_blocking=True)
                if padding is not None:
                    padding.zero_()
                entry.in_event = torch.cuda.Event()
                entry.in_event.record(stream)
            # A prefetched copy may be dropped unread: its block must outlive the copy.
            buffer.record_stream(stream)
        else:
            target.copy_(entry.host)
            if padding is not None:
                padding.zero_()
        if entry.fmt is None:
            entry.flat = buffer
            # Recomputation saves views of the restored storage; they must find this entry.
            self._register(entry, buffer.untyped_storage(), None)
        else:
            entry.packed = [staged(buffer, entry.fmt, entry.numel, entry.dtype)]
        self._set_resident(entry, True, backward=True)

    def _unpack_device(self, entry: _Entry) -> None:
        """Unpack a compressed entry's device copy, on the compute stream (where it is read)."""
        if entry.in_event is not None:
            torch.cuda.current_stream(entry.device).wait_event(entry.in_event)
            entry.in_event = None
        flat = unpack_storage(entry.packed, entry.numel)
        if entry.flat is not None and entry.fmt == "int8":
            # Restored while still copying out (CUDA): the storage itself where int8 lost it, as
            # `_copied_out` will decide, chosen on the device so that nothing waits.
            finite = torch.stack([torch.isfinite(p.scales).all() for p in entry.packed]).all()
            flat = torch.where(finite, flat, entry.flat)
        entry.flat, entry.packed = flat, None
        self._register(entry, flat.untyped_storage(), None)
        self._set_resident(entry, True, backward=True)

    def _drop(self, entry: _Entry) -> None:
        with self._lock:
            entry.refs -= 1
            if entry.refs:
                return
            for key in entry.keys:
                if self._entries.get(key) is entry:
                    del self._entries[key]
            self._set_resident(entry, False)
            entry.flat = entry.packed = None
            if entry.host is not None:
                nbytes = entry.host.numel() * entry.host.element_size()
                self.slab.free(nbytes, entry.host_in_slab)
                self.host_bytes -= nbytes
                entry.host = None

    def _stream(self, device: torch.device, direction: str) -> torch.cuda.Stream:
        # One stream each way: PCIe copies both ways at once, and a restore must not queue
        # behind the copies out of the layers before it.
        key = (device, direction)
        if key not in self._streams:
            self._streams[key] = torch.cuda.Stream(device=device)
        return self._streams[key]
