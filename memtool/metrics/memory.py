"""Process memory readings (Linux)."""

import ctypes
import functools
import resource
import sys
from pathlib import Path


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


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
