"""Cheap structural check of a .safetensors file before anything loads it.

A truncated download or a half-written file otherwise surfaces as an obscure error deep inside
the loader (or, with mmap, as a crash on first touch of the missing pages). The format is an
8-byte little-endian header length, a JSON header whose entries give `data_offsets` into the
byte buffer that follows; the file must be exactly header + buffer long.
"""

import json
import struct
from pathlib import Path

from memtool.errors import MemtoolError

_MAX_HEADER_BYTES = 100 * 2**20


def check_safetensors(path: Path) -> dict:
    """Validate `path`'s framing and return its header (tensor name -> entry).

    Raises:
        MemtoolError: the file is truncated, padded or not safetensors at all.
    """
    size = path.stat().st_size
    fix = "re-download or re-save the checkpoint"
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise MemtoolError(f"corrupt safetensors file {path}: only {size} bytes; {fix}")
        (header_bytes,) = struct.unpack("<Q", prefix)
        if header_bytes > min(_MAX_HEADER_BYTES, size - 8):
            raise MemtoolError(f"corrupt safetensors file {path}: bad header length; {fix}")
        try:
            header = json.loads(handle.read(header_bytes))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MemtoolError(
                f"corrupt safetensors file {path}: unreadable header; {fix}"
            ) from exc
    if not isinstance(header, dict):
        raise MemtoolError(f"corrupt safetensors file {path}: header is not a mapping; {fix}")
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            _start, end = entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise MemtoolError(
                f"corrupt safetensors file {path}: bad entry {name!r}; {fix}"
            ) from exc
        data_end = max(data_end, int(end))
    expected = 8 + header_bytes + data_end
    if size != expected:
        raise MemtoolError(
            f"corrupt safetensors file {path}: {size} bytes on disk but the header describes "
            f"{expected} (truncated or damaged); {fix}"
        )
    return header
