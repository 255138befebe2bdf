"""Bit-exact packing of 4-bit weights in the AWQ "GEMM" layout (AutoAWQ, transformers, vLLM).

The layout is the one AutoAWQ writes and every AWQ GEMM kernel reads (checked against AutoAWQ
`awq/modules/linear/gemm.py` `WQLinear_GEMM.from_linear` and `awq/utils/packing_utils.py`
`unpack_awq`/`reverse_awq_order`/`dequantize_gemm`):

- `qweight`: int32 `[in_features, out_features // 8]`, packed along the OUTPUT dimension;
- `qzeros`: int32 `[n_groups, out_features // 8]`, packed the same way, holding the zero points
  themselves (no `- 1`, unlike the GPTQ layout, so a zero point of 0 is storable);
- `scales`: float16 `[n_groups, out_features]`.

The weight is `W[i, o] = scales[i // group_size, o] * (q[i, o] - zero[i // group_size, o])`, with
`group_size = in_features // n_groups` (the layout has no g_idx, so groups must divide the input
dimension exactly).

Word `c` of a packed row holds output columns `8c .. 8c + 7`, but not in order: nibble `i`
(bits `4i .. 4i + 3`) holds column `8c + AWQ_ORDER[i]`, with `AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]`
(the interleave the GEMM kernel's dequantization expects). Words are stored as int32 (two's
complement of the unsigned word), as the checkpoints do.

Only 4 bits exist in this layout (`WQLinear_GEMM` raises for anything else); memtool writes other
widths in the GPTQ layout (`memtool.formats.gptq_pack`).
"""

import torch
from torch import Tensor

from memtool.errors import MemtoolError

AWQ_BITS = 4
AWQ_PACK = 32 // AWQ_BITS  # values per int32 word
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i holds column AWQ_ORDER[i] of its 8
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column j sits in nibble AWQ_REVERSE_ORDER[j]
_SHIFTS = torch.arange(0, 32, AWQ_BITS, dtype=torch.int64)
_WORD_MASK = (1 << 32) - 1


def _check_packable(values: Tensor) -> None:
    if values.dim() != 2 or values.shape[1] % AWQ_PACK:
        raise MemtoolError(
            f"the AWQ GEMM layout packs 8 values per word along the output dimension; got shape "
            f"{tuple(values.shape)} (the last dimension must be a multiple of 8)"
        )
    if values.is_floating_point() or values.is_complex():
        raise MemtoolError(f"packing needs integer codes, got {values.dtype}")
    if values.numel() and (int(values.min()) < 0 or int(values.max()) > 15):
        raise MemtoolError("4-bit AWQ codes and zero points must lie in [0, 15]")


def pack_awq_cols(values: Tensor) -> Tensor:
    """Pack 4-bit integers `[n, m]` into int32 words `[n, m // 8]` in AWQ's interleaved order."""
    _check_packable(values)
    n, m = values.shape
    blocks = values.to(torch.int64).reshape(n, m // AWQ_PACK, AWQ_PACK)
    nibbles = blocks[:, :, list(AWQ_ORDER)]  # nibble i <- column AWQ_ORDER[i]
    words = (nibbles << _SHIFTS.to(values.device)).sum(dim=-1)  # fields never overlap
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack_awq_cols(packed: Tensor) -> Tensor:
    """Inverse of `pack_awq_cols`: int32 words `[n, m // 8]` -> int32 values `[n, m]`."""
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise MemtoolError(
            f"AWQ words must be a 2-D int32 tensor, got {packed.dtype} {tuple(packed.shape)}"
        )
    words = packed.to(torch.int64) & _WORD_MASK
    nibbles = (words[:, :, None] >> _SHIFTS.to(packed.device)) & 0xF
    values = nibbles[:, :, list(AWQ_REVERSE_ORDER)]  # column j <- nibble AWQ_REVERSE_ORDER[j]
    return values.reshape(packed.shape[0], -1).to(torch.int32)


def pack_awq(q: Tensor, zeros: Tensor, scales: Tensor) -> dict[str, Tensor]:
    """Pack 4-bit codes, zero points and scales into AWQ GEMM checkpoint tensors.

    Args:
        q: integer codes `[in_features, out_features]` in `[0, 15]`.
        zeros: integer zero points `[n_groups, out_features]` in `[0, 15]`.
        scales: float scales `[n_groups, out_features]`; stored as float16.

    Returns:
        `{"qweight", "qzeros", "scales"}` as int32/int32/float16 tensors.

    Raises:
        MemtoolError: shapes that do not fit each other or the layout (out_features not a
            multiple of 8, n_groups not dividing in_features), or values out of range.
    """
    if q.dim() != 2:
        raise MemtoolError(f"q must be [in_features, out_features], got shape {tuple(q.shape)}")
    in_features, out_features = q.shape
    if zeros.dim() != 2 or zeros.shape[1] != out_features or scales.shape != zeros.shape:
        raise MemtoolError(
            f"zeros {tuple(zeros.shape)} and scales {tuple(scales.shape)} must both be "
            f"[n_groups, out_features={out_features}]"
        )
    awq_group_size(in_features, zeros.shape[0])
    return {
        "qweight": pack_awq_cols(q),
        "qzeros": pack_awq_cols(zeros),
        "scales": scales.to(torch.float16).contiguous(),
    }


def awq_group_size(in_features: int, n_groups: int) -> int:
    """Columns per group; the layout has no g_idx, so groups must tile the input exactly."""
    if n_groups <= 0 or in_features % n_groups:
        raise MemtoolError(
            f"the AWQ GEMM layout needs equal groups: {in_features} input features do not split "
            f"into {n_groups} groups"
        )
    return in_features // n_groups


def check_awq_tensors(qweight: Tensor, qzeros: Tensor, scales: Tensor) -> tuple[int, int, int]:
    """Check AWQ GEMM tensors against each other; return (in_features, out_features, group)."""
    if qweight.dim() != 2 or qweight.dtype != torch.int32:
        raise MemtoolError(f"qweight must be 2-D int32, got {qweight.dtype} {tuple(qweight.shape)}")
    in_features, out_features = qweight.shape[0], qweight.shape[1] * AWQ_PACK
    if scales.dim() != 2 or scales.shape[1] != out_features:
        raise MemtoolError(f"scales must be [n_groups, {out_features}], got {tuple(scales.shape)}")
    n_groups = scales.shape[0]
    expected = (n_groups, out_features // AWQ_PACK)
    if qzeros.dtype != torch.int32 or tuple(qzeros.shape) != expected:
        raise MemtoolError(
            f"qzeros must be int32 {list(expected)}, got {qzeros.dtype} {list(qzeros.shape)}"
        )
    return in_features, out_features, awq_group_size(in_features, n_groups)


def unpack_awq(tensors: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Unpack AWQ GEMM tensors into int32 codes `[in, out]`, int32 zeros `[n_groups, out]` and
    the scales as stored."""
    missing = {"qweight", "qzeros", "scales"} - tensors.keys()
    if missing:
        raise MemtoolError(f"AWQ tensors are missing {sorted(missing)}")
    check_awq_tensors(tensors["qweight"], tensors["qzeros"], tensors["scales"])
    q = unpack_awq_cols(tensors["qweight"])
    return q, unpack_awq_cols(tensors["qzeros"]), tensors["scales"]


def dequantize_awq(qweight: Tensor, qzeros: Tensor, scales: Tensor) -> Tensor:
    """The reference dequantization: float32 `[in_features, out_features]` (AutoAWQ's
    `dequantize_gemm`, computed in float32; the integer subtraction first, so the only rounding
    is the one product)."""
    _, _, size = check_awq_tensors(qweight, qzeros, scales)
    q = unpack_awq_cols(qweight)
    zeros = unpack_awq_cols(qzeros).repeat_interleave(size, dim=0)
    return scales.float().repeat_interleave(size, dim=0) * (q - zeros).float()
