"""Compressed host copies of swapped activation storages: formats, host layout, restore buffers.

Swapping (activation_swap.py) moves whole storages, flattened to 1-D. Compression runs
`memtool.ops.pack_activation` on the way out and `unpack_activation` on the way back (backend
auto: Triton on CUDA, the reference on CPU; the first call logs which), so the kernels are the
ones tested against their specification in `memtool.ops.reference_train`.

- "bf16" keeps float32 storages as bfloat16 (float16 and bfloat16 storages gain nothing from it
  and are kept as they are).
- "int8" keeps float32, float16 and bfloat16 storages as int8 with one float32 absmax scale per
  `INT8_ROW_ELEMENTS` consecutive elements of the flat storage: a scale per small block rather
  than per storage, so one outlier costs precision in 256 values, not in a whole activation.
  A storage whose length is not a multiple of the row is packed as its whole rows plus the
  remainder as one shorter row of its own: zero padding would quantise the same, but would cost
  a padded copy of the storage on the device and padding bytes on the host.

Integer and bool storages are never compressed. The host copy of an int8 storage of n elements is
exactly `4 * ceil(n / 256) + n` bytes, every scale then every value (`host_views`); it comes back
into a device buffer whose last row is zero-padded (`staged`), so that one kernel call unpacks it.

A row holding inf has no int8 scale, and CUDA's memory-efficient attention pads the logsumexp it
saves with inf: the swap keeps a storage whose scales are not all finite on the device instead
(`host_scales`). NaN reaches the scale on the reference, whose max propagates it, but not always
on Triton, whose max may skip it; an activation holding NaN has made the step non-finite anyway.
"""

from __future__ import annotations

import torch
from torch import Tensor

from memtool.ops import Packed, pack_activation, unpack_activation
from memtool.ops.reference_train import PACKABLE_DTYPES

# One float32 scale per 256 elements: 1.6% over the int8 values. Hidden sizes are mostly multiples
# of it, so in a [tokens, hidden] activation a row never mixes two tokens.
INT8_ROW_ELEMENTS = 256
COMPRESS_FORMATS = (None, "bf16", "int8")
_SCALE_BYTES = torch.float32.itemsize


def storage_format(compress: str | None, dtype: torch.dtype, numel: int) -> str | None:
    """How the host keeps a swapped storage of `numel` elements of `dtype` under `compress`:
    None (as is), "bf16" or "int8"."""
    if numel == 0:
        return None
    if compress == "bf16" and dtype == torch.float32:
        return "bf16"
    if compress == "int8" and dtype in PACKABLE_DTYPES:
        return "int8"
    return None


def pack_storage(flat: Tensor, fmt: str) -> list[Packed]:
    """A flat storage packed as one bf16 part, or as int8 rows of `INT8_ROW_ELEMENTS` plus the
    remainder as one shorter row."""
    if fmt == "bf16":
        return [pack_activation(flat, "bf16")]
    whole = flat.numel() // INT8_ROW_ELEMENTS * INT8_ROW_ELEMENTS
    parts = [pack_activation(flat[:whole].view(-1, INT8_ROW_ELEMENTS), "int8")] if whole else []
    if whole < flat.numel():
        parts.append(pack_activation(flat[whole:].view(1, -1), "int8"))
    return parts


def host_views(blob: Tensor, parts: list[Packed]) -> list[tuple[Tensor, Tensor]]:
    """(host view, device tensor) pairs laying `parts` out in `blob`: every scale, then every value.

    `blob` is uint8 of `sum(p.nbytes for p in parts)` bytes, starting 4-byte aligned (host slab
    allocations are). Scales first stay aligned; the values then run on without a gap, so the
    int8 rows read back as one block (`staged`).
    """
    tensors = [p.scales for p in parts if p.scales is not None] + [p.data for p in parts]
    pairs, offset = [], 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        pairs.append((blob[offset : offset + nbytes].view(t.dtype).view(t.shape), t))
        offset += nbytes
    return pairs


def host_scales(blob: Tensor, numel: int) -> Tensor:
    """The float32 scales at the head of an int8 storage's host copy (see `host_views`)."""
    return blob[: _int8_rows(numel) * _SCALE_BYTES].view(torch.float32)


def staged_nbytes(fmt: str, numel: int) -> int:
    """Device bytes a packed storage is copied back into: int8's last row padded to a whole row."""
    if fmt == "bf16":
        return numel * torch.bfloat16.itemsize
    rows = _int8_rows(numel)
    return rows * _SCALE_BYTES + rows * INT8_ROW_ELEMENTS


def staged(buffer: Tensor, fmt: str, numel: int, dtype: torch.dtype) -> Packed:
    """The host copy as copied back into `buffer` (`staged_nbytes`), as one `Packed`.

    int8: `[rows, INT8_ROW_ELEMENTS]` with the last row zero-padded; zeros quantise to zeros
    under any scale, so the short row unpacks to what it would alone, followed by zeros.
    """
    if fmt == "bf16":
        data = buffer.view(torch.bfloat16)
        return Packed("bf16", data, None, data.shape, dtype)
    scales = host_scales(buffer, numel)
    data = buffer[scales.nbytes :].view(torch.int8).view(-1, INT8_ROW_ELEMENTS)
    return Packed("int8", data, scales, data.shape, dtype)


def unpack_storage(parts: list[Packed], numel: int) -> Tensor:
    """The flat storage back in its dtype; a padded last row stays in the storage, unviewed."""
    flats = [unpack_activation(p).view(-1) for p in parts]
    return (flats[0] if len(flats) == 1 else torch.cat(flats))[:numel]


def _int8_rows(numel: int) -> int:
    return -(-numel // INT8_ROW_ELEMENTS)
