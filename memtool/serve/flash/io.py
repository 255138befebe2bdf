"""Reading FFN neuron bundles from a flash store: O_DIRECT, coalesced, from a thread pool.

Measured on this project's development VM (ext4 on a virtual NVMe disk, O_DIRECT, random
4 KiB-aligned reads): about 10k reads/s whatever their size up to 64 KiB (4 KiB: 46 MB/s,
64 KiB: 680 MB/s with 8 threads) and about 700 MB/s at best. A bundle of the default model is
3.5 KiB, so one read per neuron would spend 100 µs on each 3.5 KiB; the reader instead reads
spans of consecutive bundles and also reads across short gaps of unwanted bundles when that costs
less than another read ("LLM in a flash" §3.2: larger chunks buy throughput). `gap_bytes`
sets how large a gap of unwanted bundles may be; the default suits the figures above (a read's
fixed cost is worth about 64 KiB of transfer). Reads of one staging load run in parallel on a
thread pool while the caller computes on the previous load (double buffering).

`O_DIRECT` bypasses the page cache, so every byte counted here came from the device: the point
when the budget is the memory the process may use. Where the filesystem refuses it (tmpfs,
some overlays), reads are buffered, `posix_fadvise(RANDOM)` turns off read-ahead, and
`page_cache` is True in the stats: the kernel may then serve repeated reads from RAM that the
budget does not count.
"""

import contextlib
import errno
import mmap
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import Tensor

from memtool.errors import MemtoolError

# O_DIRECT needs file offsets, lengths and memory addresses aligned to the device's logical
# block: 512 bytes on most drives (bundles are padded to it, so a span of bundles is already
# aligned and lands in the staging buffer packed), 4096 on 4Kn drives (spans are rounded out).
DIRECT_ALIGNMENTS = (512, 4096)
# Read through gaps up to this many bytes instead of a new read: NeuronReader's default. The
# engine measures the gap on the device instead (`measure_gap`); 64 KiB was that measure here
# on 2026-11-28, and 23-31 KB a day later.
DEFAULT_GAP_BYTES = 64 << 10
MAX_READ_BYTES = 256 << 10  # longer spans are split: reads this size already reach ~700 MB/s


@dataclass
class ReadStats:
    """Counters over the reader's life; `snapshot()` gives a copy to diff."""

    bytes_read: int = 0
    bytes_wanted: int = 0  # bytes of bundles asked for (the rest of bytes_read is gaps)
    reads: int = 0
    seconds: float = 0.0  # wall time waiting for reads (the pool's parallel batches)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def snapshot(self) -> "ReadStats":
        return ReadStats(self.bytes_read, self.bytes_wanted, self.reads, self.seconds)

    def minus(self, earlier: "ReadStats") -> dict:
        return {
            "bytes_read": self.bytes_read - earlier.bytes_read,
            "bytes_wanted": self.bytes_wanted - earlier.bytes_wanted,
            "reads": self.reads - earlier.reads,
            "io_seconds": self.seconds - earlier.seconds,
        }


@dataclass(frozen=True)
class Span:
    """One read: `count` bundles from bundle `first`, `wanted` of which were asked for."""

    first: int
    count: int
    wanted: int


def span_arrays(
    ids: list[int] | Tensor, gap_bundles: int, max_bundles: int
) -> tuple[Tensor, Tensor, Tensor]:
    """`plan_spans` as three long tensors (first, count, wanted), computed without a loop over
    ids or spans: the engine plans thousands of reads a token (per-read Python work was a third
    of a token's time on the OPT-1.3B shape)."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, empty
    # Runs: ids separated by gaps of at most gap_bundles unwanted bundles.
    new_run = torch.ones_like(ids, dtype=torch.bool)
    new_run[1:] = ids[1:] - ids[:-1] - 1 > gap_bundles
    run = torch.cumsum(new_run, 0) - 1
    run_first = ids[new_run]
    # A run longer than max_bundles is cut on a grid of max_bundles from its first id; each
    # piece is then trimmed to the wanted ids in it.
    bucket = (ids - run_first[run]) // max_bundles
    new_piece = new_run.clone()
    new_piece[1:] |= bucket[1:] != bucket[:-1]
    starts = torch.nonzero(new_piece).flatten()
    ends = torch.cat([starts[1:], torch.tensor([ids.numel()])])
    first = ids[starts]
    return first, ids[ends - 1] - first + 1, ends - starts


def plan_spans(ids: list[int] | Tensor, gap_bundles: int, max_bundles: int) -> list[Span]:
    """Cover sorted, distinct bundle ids with reads: runs merge across gaps of at most
    `gap_bundles` unwanted bundles, and no read holds more than `max_bundles` bundles."""
    arrays = span_arrays(ids, gap_bundles, max_bundles)
    return [Span(*values) for values in zip(*(a.tolist() for a in arrays), strict=True)]


class NeuronReader:
    """Reads bundles of one store file into pinned host staging, `threads` reads at a time.

    Args:
        path: the store's `ffn.bin`.
        threads: reads in flight at once.
        direct: try O_DIRECT (falls back to buffered reads where refused); False: buffered.
        gap_bytes: read through gaps of unwanted bundles up to this size instead of issuing a
            new read; 0 reads only wanted bundles (the "no coalescing" ablation).
        staging_bytes: size of the aligned staging buffer (counted in the memory budget); larger
            calls are read in several rounds.
        native: issue each load's reads in one call of the native `pread_spans` op (an OpenMP
            team, the GIL released) where memtool's CPU kernels build; False, or where they do
            not, Python threads issue them (each thread a share of the load).
    """

    def __init__(
        self,
        path: Path,
        threads: int = 8,
        direct: bool = True,
        gap_bytes: int = DEFAULT_GAP_BYTES,
        staging_bytes: int = 4 << 20,
        native: bool = True,
    ) -> None:
        if threads < 1:
            raise MemtoolError(f"--io-threads must be at least 1, not {threads}")
        self.path = Path(path)
        self.threads = threads
        self.gap_bytes = gap_bytes
        self.stats = ReadStats()
        self.direct = False
        self._fd = -1
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
                self.direct = True
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_RDONLY)
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_RANDOM)
        self._staging_bytes = _round_up(staging_bytes, 4096)
        self._staging = mmap.mmap(-1, self._staging_bytes)  # page-aligned, as O_DIRECT needs
        self._view = memoryview(self._staging)
        self.align = self._probe_alignment() if self.direct else 1
        self._staging_u8 = torch.frombuffer(self._staging, dtype=torch.uint8)
        self.native = native and native_reads_available()
        # Native: one worker thread runs each load's op while the caller computes on the last.
        workers = 1 if self.native else threads
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="memtool-io")
        self._prefetched: tuple | None = None  # (offset, load, futures, stride): `prefetch`
        self._streaming: list | None = None  # a stream's reads in flight, not yet waited for

    def _probe_alignment(self) -> int:
        """The smallest O_DIRECT alignment this file's device takes (512 or 4096)."""
        size = os.fstat(self._fd).st_size
        for align in DIRECT_ALIGNMENTS:
            if size < 2 * align:
                continue
            try:
                os.preadv(self._fd, [self._view[align : 2 * align]], align)
                return align
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
        return DIRECT_ALIGNMENTS[-1]

    @property
    def page_cache(self) -> bool:
        """True when reads go through the page cache (no O_DIRECT here)."""
        return not self.direct

    def close(self) -> None:
        if self._fd >= 0:
            self._prefetched = None  # its reads finish before the pool shuts down
            self._pool.shutdown(wait=True)
            os.close(self._fd)
            self._fd = -1
            self._staging_u8 = None
            self._view.release()
            self._staging.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown modules may be gone
            self.close()

    def stream(
        self, offset: int, stride_bytes: int, ids: list[int] | Tensor, first_half: int = 0
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Bundles `ids` (sorted, distinct) of the region at `offset`: yields (bundle ids
        [n], uint8 view [n, stride_bytes]) per staging load, or per span when alignment
        padding separates the spans in the buffer.

        The staging buffer is used in two halves: while the caller works on one load, the
        next one is already being read into the other half (the reads of one load run in
        parallel), so compute and I/O overlap. The first load is read into `first_half` and
        its reads are issued before this returns, so a caller may still work on the other half
        (a lookahead load, `take_prefetch`) while they run. The ids include unwanted bundles
        read through gaps. Each view is valid until the next item is taken.

        Raises:
            MemtoolError: a short read (the store shrank underneath us) or a failed one.
        """
        self._quiet()
        loads = self._plan(offset, stride_bytes, ids)
        pending = self._submit(loads[0], first_half * self._half) if loads else None
        self._streaming = pending
        return self._loads(loads, pending, first_half, stride_bytes)

    def _quiet(self) -> None:
        """Before new reads into the staging buffer: wait for every read still in flight (an
        untaken prefetch, dropped; a stream left before its end), so that none can land under
        the new ones."""
        self.drain_prefetch()
        if self._streaming is not None:
            for future in self._streaming:
                future.exception()  # waits; its error belonged to the abandoned stream
            self._streaming = None

    def _loads(
        self, loads: list["_Spans"], pending: list | None, first_half: int, stride_bytes: int
    ) -> Iterator[tuple[Tensor, Tensor]]:
        for index, load in enumerate(loads):
            base = ((first_half + index) % 2) * self._half
            self._wait(pending, load, stride_bytes)
            self._streaming = None
            if index + 1 < len(loads):
                pending = self._submit(
                    loads[index + 1], ((first_half + index + 1) % 2) * self._half
                )
                self._streaming = pending
            yield from self._views(load, base, stride_bytes)

    @property
    def _half(self) -> int:
        return self._staging_bytes // 2 // 4096 * 4096

    def _plan(self, offset: int, stride_bytes: int, ids: list[int] | Tensor) -> list["_Spans"]:
        """The reads covering `ids`, in staging loads of at most half the staging buffer."""
        half = self._half
        gap = self.gap_bytes // stride_bytes
        max_bundles = max(1, min(MAX_READ_BYTES, half - self.align) // stride_bytes)
        first, count, wanted = span_arrays(ids, gap, max_bundles)
        start = offset + first * stride_bytes
        aligned = start - start % self.align
        length = -(-(start + count * stride_bytes - aligned) // self.align) * self.align
        cursor, bounds = _pack(half, length.tolist())
        spans = _Spans(first, count, wanted, aligned, length, start - aligned, cursor)
        return [spans.part(i, j) for i, j in bounds]

    def prefetch(self, offset: int, stride_bytes: int, ids: list[int] | Tensor) -> bool:
        """Start reading bundles `ids` (sorted, distinct) of the region at `offset` ahead of
        need, into the first half of the staging buffer, and return at once (False: no ids).

        Only the first staging load of their reads is issued: the rest of the buffer stays
        free for the reads the caller makes once it knows what it needs. `take_prefetch`
        waits for the reads and gives the bundles; any other read on this reader first waits
        for an untaken prefetch and drops it (counted in the stats all the same), so a
        prefetch can never overwrite the staging buffer under a later read.
        """
        self._quiet()
        loads = self._plan(offset, stride_bytes, ids)
        if not loads:
            return False
        self._prefetched = (offset, loads[0], self._submit(loads[0], 0), stride_bytes)
        return True

    def take_prefetch(self, offset: int | None = None) -> list[tuple[Tensor, Tensor]]:
        """The prefetched bundles as `stream` yields them (views into the staging buffer's
        first half, valid until the next read), after waiting for their reads; [] if none, or
        if `offset` is given and the prefetch was of another region (then dropped)."""
        if self._prefetched is None:
            return []
        region, load, stride_bytes = self._finish_prefetch()
        if offset is not None and offset != region:
            return []
        return list(self._views(load, 0, stride_bytes))

    def drain_prefetch(self) -> None:
        """Wait for an untaken prefetch's reads and drop them."""
        if self._prefetched is not None:
            self._finish_prefetch()

    def _finish_prefetch(self) -> tuple:
        """Wait for the prefetch's reads (counted like any others); (offset, load, stride)."""
        region, load, pending, stride_bytes = self._prefetched
        self._prefetched = None
        self._wait(pending, load, stride_bytes)
        return region, load, stride_bytes

    def read_bundles(self, offset: int, stride_bytes: int, ids: list[int] | Tensor) -> Tensor:
        """Bundles `ids` (sorted, distinct) as a new uint8 tensor [len(ids), stride_bytes]."""
        picked = torch.empty(len(ids), stride_bytes, dtype=torch.uint8)
        wanted = torch.as_tensor(ids, dtype=torch.long)
        row = 0
        for got, block in self.stream(offset, stride_bytes, ids):
            # The wanted ids read in this item: the next run of `ids`, all inside `got`.
            end = row + int(torch.isin(wanted[row:], got).sum())
            picked[row:end] = block[torch.searchsorted(got, wanted[row:end])]
            row = end
        return picked

    def _submit(self, load: "_Spans", base: int) -> list:
        if self.native:
            args = (self._fd, self._staging_u8, load.aligned, load.length, load.cursor + base)
            return [self._pool.submit(torch.ops.memtool_cpu.pread_spans, *args, self.threads)]
        # One task per thread, each a share of the reads (dealt round-robin, so the shares are
        # alike): a future per read cost more Python time than the read itself.
        columns = (load.cursor, load.aligned, load.length)
        jobs = list(zip(*(c.tolist() for c in columns), strict=True))
        shares = [jobs[k :: self.threads] for k in range(min(self.threads, len(jobs)))]
        return [self._pool.submit(self._read_share, share, base) for share in shares]

    def _wait(self, futures: list, load: "_Spans", stride_bytes: int) -> None:
        """Waits for one load's reads (the wait is what the I/O time counts) and checks that
        each read got its bundles (a short aligned read at the file's end is fine if so)."""
        began = time.perf_counter()
        results = [future.result() for future in futures]
        seconds = time.perf_counter() - began
        if self.native:
            got = results[0]
        else:  # share k holds reads k, k + threads, ...
            got = torch.empty(load.first.numel(), dtype=torch.long)
            for k, share in enumerate(results):
                got[k :: self.threads] = torch.tensor(share, dtype=torch.long)
        failed = got < 0
        if bool(failed.any()):
            reason = os.strerror(-int(got[failed][0]))
            raise MemtoolError(f"reading {self.path} failed: {reason}")
        if bool((got < load.skip + load.count * stride_bytes).any()):
            raise MemtoolError(f"short read from {self.path}: the store is truncated; rebuild it")
        with self.stats._lock:
            self.stats.bytes_read += int(got.sum())
            self.stats.bytes_wanted += int(load.wanted.sum()) * stride_bytes
            self.stats.reads += load.first.numel()
            self.stats.seconds += seconds

    def _views(
        self, load: "_Spans", base: int, stride_bytes: int
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """One load's bundles: packed as one view, or span by span around alignment padding."""
        total = int(load.count.sum())
        packed = int(load.skip.abs().sum()) == 0 and int(load.length.sum()) == total * stride_bytes
        if packed:
            # Bundle ids in load order: steps of 1 within a span, a jump to the next span's
            # first id at each span's start (a cumulative sum; repeat_interleave was slower).
            steps = torch.ones(total, dtype=torch.long)
            starts = torch.cumsum(load.count, 0) - load.count
            steps[starts[1:]] = load.first[1:] - (load.first[:-1] + load.count[:-1] - 1)
            steps[0] = load.first[0]
            end = base + total * stride_bytes
            yield torch.cumsum(steps, 0), self._staging_u8[base:end].view(-1, stride_bytes)
            return
        columns = (
            load.cursor.tolist(),
            load.skip.tolist(),
            load.first.tolist(),
            load.count.tolist(),
        )
        for cursor, skip, first, count in zip(*columns, strict=True):
            start = base + cursor + skip
            block = self._staging_u8[start : start + count * stride_bytes]
            yield torch.arange(first, first + count), block.view(count, stride_bytes)

    def measure_gap(
        self, stride_bytes: int, small_reads: int = 256, repeats: int = 3, seed: int = 0
    ) -> dict:
        """The gap worth reading through on this file's device: what one read costs, in bytes.

        Times this reader's own parallel reads (same threads, same O_DIRECT path) at random
        places of the file: `small_reads` reads of one bundle each, then the staging buffer
        in reads of `MAX_READ_BYTES`. The per-read cost (small reads' time per read) times the
        bandwidth (large reads' bytes per second) is the gap that costs as much to read as a
        new read does; each is the median of `repeats` rounds (~50 ms each on this project's VM,
        where a single round sometimes read 2-3x high). Not counted in `stats`. Returns the gap
        and both measurements.
        """
        self._quiet()
        size = os.fstat(self._fd).st_size
        small = _round_up(stride_bytes, self.align)
        count = max(1, min(small_reads, self._staging_bytes // small))
        generator = torch.Generator().manual_seed(seed)

        def timed(length: int, n: int) -> tuple[float, int]:
            """Seconds for `n` parallel reads of `length` bytes, and the bytes they got."""
            places = torch.randint(
                0, max(1, (size - length) // self.align), (n,), generator=generator
            )
            load = _Spans(
                *(torch.zeros(n, dtype=torch.long),) * 3,
                aligned=places * self.align,
                length=torch.full((n,), length, dtype=torch.long),
                skip=torch.zeros(n, dtype=torch.long),
                cursor=torch.arange(n, dtype=torch.long) * length,
            )
            began = time.perf_counter()
            results = [future.result() for future in self._submit(load, 0)]
            seconds = time.perf_counter() - began
            # Native: one tensor of bytes per read; Python threads: a list per share.
            got = int(results[0].sum()) if self.native else sum(map(sum, results))
            return seconds, got

        timed(small, count)  # warm-up: the thread team, the device's queue
        large = min(MAX_READ_BYTES, self._staging_bytes)
        per_reads, bandwidths = [], []
        for _ in range(repeats):  # the median of a few rounds: one burst can stall
            per_reads.append(timed(small, count)[0] / count)
            seconds, got = timed(large, max(1, self._staging_bytes // large))
            # Bytes actually read: a file shorter than the reads (a tiny store) returns fewer.
            bandwidths.append(got / seconds)
        per_read = sorted(per_reads)[repeats // 2]
        bandwidth = sorted(bandwidths)[repeats // 2]
        gap = int(min(max(per_read * bandwidth, 0), MAX_READ_BYTES // 2))  # failed reads: 0
        return {"gap_bytes": gap, "per_read_s": per_read, "bytes_per_s": bandwidth}

    def _read_share(self, share: list[tuple], base: int) -> list[int]:
        return [self._read_one(job, base) for job in share]

    def _read_one(self, job: tuple, base: int) -> int:
        """Bytes read into the staging buffer (fewer at the file's end), or -errno."""
        cursor, offset, length = job
        cursor += base
        done = 0
        while done < length:
            try:
                got = os.preadv(
                    self._fd, [self._view[cursor + done : cursor + length]], offset + done
                )
            except OSError as exc:
                return -(exc.errno or errno.EIO)
            if got <= 0:
                break
            done += got
        return done


@dataclass(frozen=True)
class _Spans:
    """Reads as columns: bundle span (first, count, wanted), file range (aligned offset,
    length), bytes of alignment before the span (skip), and where in its half it lands."""

    first: Tensor
    count: Tensor
    wanted: Tensor
    aligned: Tensor
    length: Tensor
    skip: Tensor
    cursor: Tensor

    def part(self, begin: int, end: int) -> "_Spans":
        return _Spans(*(getattr(self, f.name)[begin:end] for f in fields(self)))


def _pack(half: int, lengths: list[int]) -> tuple[Tensor, list[tuple[int, int]]]:
    """Reads of `lengths` bytes packed in order into loads of at most `half` bytes: each read's
    offset within its load, and each load's [begin, end) range of reads."""
    cursors: list[int] = []
    bounds: list[tuple[int, int]] = []
    begin, cursor = 0, 0
    for index, length in enumerate(lengths):
        if cursor + length > half and index > begin:  # this half is full: start the next load
            bounds.append((begin, index))
            begin, cursor = index, 0
        cursors.append(cursor)
        cursor += length
    if lengths:
        bounds.append((begin, len(lengths)))
    return torch.tensor(cursors, dtype=torch.long), bounds


def native_reads_available() -> bool:
    """Whether the native batched reader (`pread_spans`, memtool's CPU kernels) runs here."""
    from memtool.ops.cpu.build import load_kernel

    return load_kernel()[0]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
