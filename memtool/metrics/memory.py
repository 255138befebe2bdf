"""Process memory readings (Linux)."""

import resource
import sys


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (loading included)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux and bytes on macOS.
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024
