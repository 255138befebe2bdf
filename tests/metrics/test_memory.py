"""Peak RSS: this process's own, not one inherited from the process that started it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from memtool.metrics.memory import (
    large_allocations_mapped,
    peak_rss_bytes,
    release_freed_memory,
)


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


def _rss() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def test_release_freed_memory_returns_freed_heap_pages():
    rss = _rss

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


def _resident_after_freeing_every_other_block() -> int:
    """Bytes still resident after touching 100 blocks of 2 MiB and freeing every other one
    (50 of them, 100 MiB, live)."""
    before = _rss()
    blocks = [bytearray(2 << 20) for _ in range(100)]
    del blocks[::2]
    resident = _rss() - before
    del blocks
    return resident


@pytest.mark.skipif(
    not Path("/proc/self/status").exists() or "MALLOC_MMAP_THRESHOLD_" in os.environ,
    reason="Linux /proc only; a user-set glibc threshold turns the context off",
)
def test_large_allocations_mapped_gives_freed_blocks_back_at_once():
    """Heap blocks between live ones stay resident when freed (glibc's threshold climbs to
    32 MiB in a torch process, and the test pins it there); inside the context each 2 MiB
    block is its own mapping and leaves the resident set when freed."""
    import ctypes

    ctypes.CDLL("libc.so.6").mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: a torch process's
    heap = _resident_after_freeing_every_other_block()
    with large_allocations_mapped(1 << 20):
        mapped = _resident_after_freeing_every_other_block()
    assert heap > 180 << 20  # the 50 freed blocks are still counted
    assert mapped < 130 << 20  # only the 50 live ones
    release_freed_memory()


def _rss_file_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc only")
def test_file_pages_under_a_tensor_are_given_back_and_read_again(tmp_path):
    """A tensor over a private file mapping (how a safetensors checkpoint loads): its pages,
    once read, leave the resident set when dropped, and reading it again gives the same bytes.
    A tensor something else still holds is left alone."""
    import mmap

    import torch

    from memtool.metrics.memory import drop_file_pages

    values = torch.arange(8 * 2**20, dtype=torch.int32)  # 32 MiB
    path = tmp_path / "weights.bin"
    path.write_bytes(values.numpy().tobytes())
    with path.open("rb") as file:
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    tensor = torch.frombuffer(mapped, dtype=torch.int32)
    held = tensor.view(-1)  # a second holder of the same storage
    assert int(tensor.sum()) == int(values.sum())  # every page read
    assert drop_file_pages([tensor]) == 0
    del held
    before = _rss_file_bytes()
    assert drop_file_pages([tensor]) == 32 * 2**20
    assert before - _rss_file_bytes() > 24 * 2**20
    assert torch.equal(tensor, values)
