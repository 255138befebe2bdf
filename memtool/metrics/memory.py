"""Process memory readings (Linux)."""

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
