"""The in-memory form of a quantized weight: unpacked codes and group parameters."""

from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    """Codes and group parameters of one linear weight [out_features, in_features].

    Attributes:
        codes: uint8 [out, in], values in [0, 2^bits - 1].
        scales: float32 [out, n_groups].
        zeros: int32 [out, n_groups] integer zero points.
        g_idx: int32 [in]: the group of each input column.
        bits: code width.
        group_size: columns per group (in_features for one group per row).
        sym: whether zeros are fixed at 2^(bits-1).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int
    sym: bool

    def dequantize(self) -> torch.Tensor:
        """float32 [out, in] weights the codes stand for."""
        g = self.g_idx.long()
        return self.scales[:, g] * (self.codes.float() - self.zeros[:, g].float())
