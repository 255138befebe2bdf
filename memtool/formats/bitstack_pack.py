"""Packing BitStack sign matrices at one bit per weight.

A residual block of a BitStack linear `[out_features, in_features]` is `S ⊙ (u vᵀ)` with `S` a
±1 matrix. `S` is packed along the input dimension, eight columns per byte, little-endian in
the byte: bit `b` of byte `c` in row `r` is column `8c + b`, set when the sign is negative
(zero counts as +1, as in the paper). A row of `in_features` columns takes `ceil(in / 8)`
bytes; the padding bits of the last byte are zero.
"""

import torch
from torch import Tensor

from memtool.errors import MemtoolError

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def packed_width(in_features: int) -> int:
    """Bytes per packed row."""
    return (in_features + 7) // 8


def pack_signs(matrix: Tensor) -> Tensor:
    """Pack the signs of `matrix` `[..., rows, cols]` into uint8 `[..., rows, ceil(cols / 8)]`."""
    cols = matrix.shape[-1]
    negative = matrix < 0
    pad = packed_width(cols) * 8 - cols
    if pad:
        negative = torch.nn.functional.pad(negative, (0, pad))
    bits = negative.reshape(*negative.shape[:-1], -1, 8).to(torch.uint8)
    return (bits * _BIT_WEIGHTS.to(bits.device)).sum(dim=-1, dtype=torch.uint8)


def unpack_signs(packed: Tensor, in_features: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """±1 values `[..., rows, in_features]` of `dtype` from packed uint8 `[..., rows, bytes]`."""
    if packed.dtype != torch.uint8:
        raise MemtoolError(f"packed signs must be uint8, got {packed.dtype}")
    if packed.shape[-1] != packed_width(in_features):
        raise MemtoolError(
            f"packed signs have {packed.shape[-1]} bytes per row; {in_features} columns need "
            f"{packed_width(in_features)}"
        )
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # [..., rows, bytes, 8]
    bits = bits.reshape(*packed.shape[:-1], -1)[..., :in_features]
    return (1 - 2 * bits.to(torch.int8)).to(dtype)
