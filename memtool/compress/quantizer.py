"""Uniform integer quantization of weight groups, shared by RTN, GPTQ and AWQ.

A weight row is cut into groups of `group_size` input columns (the last group may be shorter:
576 columns with groups of 128 give 4 full groups and one of 64). Each (row, group) gets a scale
and an integer zero point; a weight is stored as a code q in [0, 2^bits - 1] and read back as
`scale * (q - zero)`. Symmetric quantization fixes the zero at 2^(bits-1) (the convention of
GPTQ checkpoints), asymmetric fits it to the group's min and max.

`QuantizedWeight` (in `memtool.formats`) keeps codes unpacked in memory; `memtool.formats`
packs them into the standard on-disk layout.
"""

import torch

from memtool.errors import MemtoolError
from memtool.formats.quantized_weight import QuantizedWeight

__all__ = [
    "SUPPORTED_BITS",
    "QuantizedWeight",
    "check_bits",
    "fit_params",
    "quantize_codes",
    "resolve_group_size",
    "rtn_quantize",
]

SUPPORTED_BITS = (2, 3, 4, 8)


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise MemtoolError(f"--bits {bits} is not supported: use one of 2, 3, 4, 8")


def resolve_group_size(group_size: int, in_features: int) -> int:
    """-1 (or anything >= in_features) means one group per row."""
    if group_size == -1 or group_size >= in_features:
        return in_features
    if group_size <= 0:
        raise MemtoolError(f"--group-size {group_size} must be positive or -1 (per channel)")
    return group_size


def fit_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero per row of `w` [rows, cols] from its min/max (the GPTQ quantizer).

    Returns float32 scales and float32 integer-valued zeros, each [rows].
    """
    maxq = 2**bits - 1
    w = w.float()
    zero_t = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device)
    wmin = torch.minimum(w.min(dim=1).values, zero_t)
    wmax = torch.maximum(w.max(dim=1).values, zero_t)
    if sym:
        wmax = torch.maximum(wmin.abs(), wmax)
        wmin = -wmax
    # An all-zero row would give scale 0; any positive scale represents it exactly.
    degenerate = (wmin == 0) & (wmax == 0)
    wmin = torch.where(degenerate, torch.full_like(wmin, -1.0), wmin)
    wmax = torch.where(degenerate, torch.full_like(wmax, 1.0), wmax)
    # Checkpoints store scales in float16; round now so the codes are fitted to the scale that
    # will actually be used (a float32 scale rounded only at save time shifts every weight).
    scale = ((wmax - wmin) / maxq).half().float().clamp_min(2**-24)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        # GPTQ checkpoints store zero - 1, so a zero point of 0 cannot be written; 1 costs at
        # most the top code of a group whose minimum is exactly 0.
        zero = torch.round(-wmin / scale).clamp(1, maxq)
    return scale, zero


def quantize_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    """Codes (float, integer-valued) of `w` [rows, cols] with per-row `scale`, `zero` [rows]."""
    maxq = 2**bits - 1
    return torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, maxq)


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int, sym: bool) -> QuantizedWeight:
    """Round-to-nearest quantization of `weight` [out, in] (the baseline every method must beat)."""
    check_bits(bits)
    out_features, in_features = weight.shape
    group_size = resolve_group_size(group_size, in_features)
    w = weight.detach().float()
    n_groups = -(-in_features // group_size)
    codes = torch.empty(out_features, in_features, dtype=torch.uint8, device=w.device)
    scales = torch.empty(out_features, n_groups, dtype=torch.float32, device=w.device)
    zeros = torch.empty(out_features, n_groups, dtype=torch.int32, device=w.device)
    for g in range(n_groups):
        cols = slice(g * group_size, min((g + 1) * group_size, in_features))
        scale, zero = fit_params(w[:, cols], bits, sym)
        codes[:, cols] = quantize_codes(w[:, cols], scale, zero, bits).to(torch.uint8)
        scales[:, g], zeros[:, g] = scale, zero.to(torch.int32)
    g_idx = (torch.arange(in_features, device=w.device) // group_size).to(torch.int32)
    return QuantizedWeight(codes, scales, zeros, g_idx, bits, group_size, sym)
