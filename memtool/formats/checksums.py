"""CRC32 checksums of tensors and file ranges: what every memtool format stores to catch damage."""

import zlib
from pathlib import Path

import torch
from torch import Tensor

_CHUNK_BYTES = 1 << 22


def tensor_crc32(tensor: Tensor) -> int:
    """CRC32 of a tensor's bytes (C order, as the tensor would be written)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return zlib.crc32(flat.numpy())


def file_crc32(path: Path, start: int = 0, length: int | None = None) -> int:
    """CRC32 of `length` bytes of `path` from `start` (to the end when None), read in chunks."""
    length = path.stat().st_size - start if length is None else length
    crc = 0
    with open(path, "rb") as handle:
        handle.seek(start)
        while length > 0:
            chunk = handle.read(min(_CHUNK_BYTES, length))
            if not chunk:
                break
            crc, length = zlib.crc32(chunk, crc), length - len(chunk)
    return crc
