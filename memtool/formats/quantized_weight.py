"""The in-memory form of a quantized weight: codes packed into bytes, and group parameters.

Codes are packed from the moment a weight is quantized: a layer-by-layer pass holds every
finished linear's codes until the checkpoint is written, and at a byte per code they were the
largest thing it held by the end (107 MB of the default model's 4-bit job; 53 MB packed).
Each code takes a slot of `slot_bits(bits)` bits (3-bit codes take 4-bit slots, two to a byte),
`8 // slot` codes to a byte along the input dimension, the first in the low bits.
"""

import torch


def slot_bits(bits: int) -> int:
    """The power-of-two slot a `bits`-wide code is held in (1, 2, 4 or 8 bits)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"codes of {bits} bits cannot be held in a byte")
    return 1 << (bits - 1).bit_length()


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [rows, ceil(cols / per_byte)] holding `codes` [rows, cols] (values < 2^bits)."""
    slot = slot_bits(bits)
    per_byte = 8 // slot
    codes = codes.to(torch.uint8)
    if per_byte == 1:
        return codes.contiguous()
    rows, cols = codes.shape
    pad = -cols % per_byte
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    shifts = torch.arange(0, 8, slot, dtype=torch.uint8, device=codes.device)
    # The slots do not overlap, so their sum is their bitwise or.
    return (codes.reshape(rows, -1, per_byte) << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """The uint8 codes [rows, cols] `pack_codes` packed."""
    slot = slot_bits(bits)
    if slot == 8:
        return packed.clone()
    shifts = torch.arange(0, 8, slot, dtype=torch.uint8, device=packed.device)
    codes = (packed[..., None] >> shifts) & ((1 << slot) - 1)
    return codes.reshape(packed.shape[0], -1)[:, :cols]


class QuantizedWeight:
    """Codes and group parameters of one linear weight [out_features, in_features].

    Attributes:
        codes: uint8 [out, in], values in [0, 2^bits - 1] (unpacked on each read; held packed
            in `packed_codes`).
        scales: float32 [out, n_groups].
        zeros: int32 [out, n_groups] integer zero points.
        g_idx: int32 [in]: the group of each input column.
        bits: code width.
        group_size: columns per group (in_features for one group per row).
        sym: whether zeros are fixed at 2^(bits-1).
    """

    def __init__(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        g_idx: torch.Tensor,
        bits: int,
        group_size: int,
        sym: bool,
    ) -> None:
        self.packed_codes = pack_codes(codes, bits)
        self.in_features = codes.shape[1]
        self.scales, self.zeros, self.g_idx = scales, zeros, g_idx
        self.bits, self.group_size, self.sym = bits, group_size, sym

    @property
    def codes(self) -> torch.Tensor:
        return unpack_codes(self.packed_codes, self.bits, self.in_features)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.packed_codes.shape[0], self.in_features)

    def rows(self, start: int, stop: int) -> "QuantizedWeight":
        """Rows [start, stop) as a weight of their own (copies: rows are independent)."""
        part = QuantizedWeight.__new__(QuantizedWeight)
        part.packed_codes = self.packed_codes[start:stop].clone()
        part.in_features = self.in_features
        part.scales = self.scales[start:stop].clone()
        part.zeros = self.zeros[start:stop].clone()
        part.g_idx = self.g_idx.clone()
        part.bits, part.group_size, part.sym = self.bits, self.group_size, self.sym
        return part

    def dequantize(self) -> torch.Tensor:
        """float32 [out, in] weights the codes stand for."""
        g = self.g_idx.long()
        return self.scales[:, g] * (self.codes.float() - self.zeros[:, g].float())

    def __repr__(self) -> str:
        out, cols = self.shape
        return (
            f"QuantizedWeight({out}x{cols}, bits={self.bits}, group_size={self.group_size}, "
            f"sym={self.sym})"
        )
