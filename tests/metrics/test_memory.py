"""Peak RSS: this process's own, not one inherited from the process that started it."""

import subprocess
import sys

from memtool.metrics.memory import peak_rss_bytes


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
