"""Host-side pieces of activation swapping: the preallocated host slab and a copy/compute clock.

Pinned host memory is what lets device-to-host copies run asynchronously, but allocating it
synchronizes the device, so it is never allocated in the middle of a step: `HostSlab` is one
preallocated buffer, carved by a bump allocator that rewinds once everything in it is freed. A step
that outgrows it spills into ordinary host memory and sets the size the slab grows to between
steps. `Stopwatch` times the measured micro-batch (layer compute, copies) for the alpha plan.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import Tensor

from memtool.sizes import format_size

logger = logging.getLogger(__name__)

# Host offsets aligned for any dtype view and for DMA-friendly pinned copies.
_ALIGN = 512


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


class HostSlab:
    """Preallocated host memory: a bump allocator that rewinds once everything in it is freed."""

    def __init__(self) -> None:
        self.buffer = torch.empty(0, dtype=torch.uint8)
        self.high_water = 0
        self._pinned = False
        self._offset = 0
        self._live = 0
        self._spilled = 0

    def alloc(self, nbytes: int, pinned: bool) -> tuple[Tensor, bool]:
        """`nbytes` of host memory and whether it lies in the slab (False: spilled)."""
        size = _aligned(nbytes)
        self._pinned |= pinned
        if self._offset + size <= self.buffer.numel():
            view = self.buffer[self._offset : self._offset + size]
            self._offset += size
            self._live += 1
            in_slab = True
        else:
            # No pinned allocation on the fly (it synchronizes the device): ordinary memory until
            # the slab grows between steps.
            view = torch.empty(size, dtype=torch.uint8)
            self._spilled += size
            in_slab = False
        self.high_water = max(self.high_water, self._offset + self._spilled)
        return view[:nbytes], in_slab

    def free(self, nbytes: int, in_slab: bool) -> None:
        if not in_slab:
            self._spilled -= _aligned(nbytes)
            return
        self._live -= 1
        if self._live == 0:
            self._offset = 0

    def grow_if_idle(self) -> None:
        """Between steps (nothing allocated), grow to the largest step seen so far."""
        if self._live or self._spilled or self.high_water <= self.buffer.numel():
            return
        self.buffer = torch.empty(self.high_water, dtype=torch.uint8, pin_memory=self._pinned)
        kind = "pinned" if self._pinned else "host"
        logger.info("activation swap: %s slab grown to %s", kind, format_size(self.high_water))


class Stopwatch:
    """Sums intervals: wall clock on CPU, CUDA events on a given stream (read once, at the end)."""

    def __init__(self) -> None:
        self._seconds = 0.0
        self._pairs: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._open: float | torch.cuda.Event | None = None

    def start(self, stream: torch.cuda.Stream | None = None) -> None:
        if stream is None:
            self._open = time.perf_counter()
            return
        self._open = torch.cuda.Event(enable_timing=True)
        self._open.record(stream)

    def stop(self, stream: torch.cuda.Stream | None = None) -> None:
        if stream is None:
            self._seconds += time.perf_counter() - self._open
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record(stream)
        self._pairs.append((self._open, end))

    def seconds(self) -> float:
        for start, end in self._pairs:
            end.synchronize()
            self._seconds += start.elapsed_time(end) / 1000
        self._pairs.clear()
        return self._seconds
