"""Writing a safetensors file one tensor at a time.

`safetensors.torch.save_file` takes every tensor at once, so exporting a sharded model through
it would hold a full copy of the weights; the format itself only needs the shapes and dtypes up
front (for the header), so we write the header, then each tensor's bytes as it is produced.
Layout (the safetensors spec): u64 little-endian header length, a JSON header padded with spaces
to a multiple of 8, then the tensors' raw little-endian bytes at the header's offsets.
"""

import json
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

from memtool.atomic import atomic_file

_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int8: "I8",
    torch.uint8: "U8",
}


def _header(specs: list[tuple[str, tuple[int, ...], torch.dtype]], metadata: dict) -> bytes:
    entries: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, shape, dtype in specs:
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        entries[name] = {
            "dtype": _DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(entries, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)


def write_safetensors(
    path: Path,
    specs: list[tuple[str, tuple[int, ...], torch.dtype]],
    tensors: Iterable[torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write `tensors` (produced lazily, in the order of `specs`) to `path` atomically.

    Args:
        specs: (name, shape, dtype) of every tensor, in file order.
        tensors: The values, one per spec; each is cast to its spec's dtype and moved to CPU.
        metadata: String key/values for the header's `__metadata__`.
    """
    header = _header(specs, metadata or {})
    with atomic_file(path) as tmp, open(tmp, "wb") as handle:
        handle.write(struct.pack("<Q", len(header)))
        handle.write(header)
        count = 0
        for (name, shape, dtype), tensor in zip(specs, tensors, strict=True):
            if tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} is not {tuple(shape)}")
            data = tensor.detach().to("cpu", dtype).contiguous()
            handle.write(data.reshape(-1).view(torch.uint8).numpy().tobytes())
            count += 1
        if count != len(specs):
            raise ValueError(f"{len(specs)} tensors declared, {count} written")
