"""Peak RSS: this process's own, not one inherited from the process that started it."""

import subprocess
import sys

from memtool.metrics.memory import peak_rss_bytes, release_freed_memory


def test_peak_rss_grows_with_touched_memory():
    before = peak_rss_bytes()
    block = bytearray(64 << 20)  # zero-filled: touched
    assert peak_rss_bytes() >= before
    assert peak_rss_bytes() >= len(block)


def test_a_child_does_not_report_its_parents_peak():
    block = bytearray(600 << 20)
    code = "from memtool.metrics.memory import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
    )
    assert child < len(block)  # ru_maxrss would say >= 600 MB here: it survives execve
    del block


def test_release_freed_memory_returns_freed_heap_pages():
    def rss() -> int:
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024

    # Small blocks (below mmap's threshold) live on the heap; one still live above them keeps
    # glibc from shrinking the heap by itself when they are freed.
    blocks = [bytearray(64 * 1024) for _ in range(3000)]  # ~200 MB, touched
    above = bytearray(64 * 1024)
    held = rss()
    del blocks
    freed = rss()
    release_freed_memory()
    assert rss() < min(held, freed) - 100 * 2**20
    del above
