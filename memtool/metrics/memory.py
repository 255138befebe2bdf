"""Process memory readings (Linux)."""

import contextlib
import ctypes
import functools
import os
import resource
import sys
from pathlib import Path

import torch


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (loading included).

    Linux: `VmHWM` of /proc/self/status, the high-water mark of this process's own address
    space. `ru_maxrss` is not used there: it survives `execve`, so a process started by a large
    parent (a benchmark driving the CLI) would report the parent's peak.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux and bytes on macOS.
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def release_freed_memory() -> None:
    """Hand memory the process has freed back to the operating system (glibc `malloc_trim`).

    glibc keeps freed heap pages for reuse, so a layer-by-layer pass whose temporaries vary in
    size grows its resident set layer after layer without holding more; trimming between layers
    keeps the peak at what is live. A no-op where glibc is not the allocator.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


# glibc's mallopt parameter, and the largest threshold its dynamic adjustment reaches on 64-bit
# (DEFAULT_MMAP_THRESHOLD_MAX, 4 MiB * sizeof(long)): what a process that has freed a large
# tensor runs with, so what a pass ends by restoring.
_M_MMAP_THRESHOLD = -3
_GLIBC_DYNAMIC_THRESHOLD_MAX = 32 << 20


@contextlib.contextmanager
def large_allocations_mapped(threshold_bytes: int = 4 << 20):
    """Within the block, serve heap allocations of `threshold_bytes` or more from their own
    memory mappings (glibc `M_MMAP_THRESHOLD`), so each goes back to the system when freed.

    glibc's threshold starts at 128 KiB and climbs (up to 32 MiB) to the size of each mapped
    block freed, so in a torch process most tensors end up carved from the heap, whose freed
    holes stay resident until a trim, between live blocks. A layer-by-layer pass allocates and
    frees tensors of many sizes at every step; mapped, its resident set follows what is live.
    The price is a fresh, zero-filled page fault on every first touch. Measured on the default
    model's 4-bit GPTQ job, 32 windows (`benchmarks/gptq_peak_memory.py`): glibc's own
    behaviour 1,076 MB peak in 106 s; 1 MiB 944 MB in 143 s; 4 MiB (the default) 945 MB in
    126 s; 16 MiB 998 MB in 126 s.
    A no-op where glibc is not the allocator, or where the user set `MALLOC_MMAP_THRESHOLD_`.
    """
    mallopt = _mallopt()
    if mallopt is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        yield
        return
    mallopt(_M_MMAP_THRESHOLD, threshold_bytes)
    try:
        yield
    finally:
        mallopt(_M_MMAP_THRESHOLD, _GLIBC_DYNAMIC_THRESHOLD_MAX)


@functools.cache
def _mallopt():
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return mallopt


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MADV_DONTNEED = 4  # Linux


def drop_file_pages(tensors) -> int:
    """Give back the resident pages under `tensors` that come from a file mapping; returns the
    bytes dropped.

    A checkpoint loaded in its stored dtype keeps its tensors in a private mapping of the
    safetensors file, and a page read once stays counted in the resident set for as long as the
    mapping lives (so for as long as any tensor of the file does). Layer-by-layer work that
    replaces each layer's tensors with float32 copies would otherwise end with the whole file
    resident beside them. Only whole pages inside each tensor are dropped, and only for tensors
    nothing else holds (their storage referenced by this call alone): the bytes are not needed
    again, and a later read would fault them back in from the file anyway.
    """
    libc = _libc()
    if libc is None or not Path("/proc/self/maps").exists():
        return 0
    page = resource.getpagesize()
    mappings = _file_mappings()
    dropped = 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        # 2: the tensor's own reference and the `storage` object just made.
        if torch._C._storage_Use_Count(storage._cdata) > 2:
            continue
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        low, high = -(-start // page) * page, end // page * page
        if high <= low or not any(a <= low and high <= b for a, b in mappings):
            continue
        if libc.madvise(ctypes.c_void_p(low), ctypes.c_size_t(high - low), _MADV_DONTNEED) == 0:
            dropped += high - low
    return dropped


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of regular files (/proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/") and fields[4] != "0":
            low, high = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((low, high))
    return ranges


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None
