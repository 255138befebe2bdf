"""Bit-exact packing of low-bit weights in the standard GPTQ checkpoint layout.

The layout is the one AutoGPTQ, GPTQModel and transformers read and write (checked against
AutoGPTQ `auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py` `QuantLinear.pack`/`forward` and
GPTQModel `gptqmodel/nn_modules/qlinear/__init__.py` `pack_block`/`dequantize_weight`):

- `qweight`: int32 `[in_features * bits // 32, out_features]`, packed along the input dimension;
- `qzeros`: int32 `[n_groups, out_features * bits // 32]`, packed along the output dimension,
  holding `zero - 1` (the "v1" convention of published GPTQ checkpoints);
- `scales`: float16 `[n_groups, out_features]`; `g_idx`: int32 `[in_features]`.

Both packings are one little-endian bit stream per packed line: value `k` occupies bits
`k * bits .. k * bits + bits - 1`, and bit `b` of the stream is bit `b % 32` of word `b // 32`.
For 2, 4 and 8 bits that is "value j of a word at shift `bits * j`". For 3 bits it reproduces
the published 10-1-10-1-10 scheme: 32 values span three words, value 10 puts its low two bits
at 30..31 of word 0 and its high bit at bit 0 of word 1, value 21 puts its low bit at bit 31 of
word 1 and its high two bits at 0..1 of word 2. Words are stored as int32 (two's complement of
the unsigned word), as the checkpoints do.

Why `zero - 1`: it is what the checkpoints hold, so a zero point of 0 cannot be stored (it
would wrap to `2**bits`); `pack_gptq` refuses it rather than write a wrong weight.
"""

import torch
from torch import Tensor

from memtool.errors import MemtoolError

SUPPORTED_BITS = (2, 3, 4, 8)
_WORD_BITS = 32
_WORD_MASK = (1 << _WORD_BITS) - 1


def check_bits(bits: int) -> None:
    """Raise `MemtoolError` unless `bits` is one the GPTQ layout defines (2, 3, 4, 8)."""
    if bits not in SUPPORTED_BITS:
        raise MemtoolError(f"bits={bits} is not supported by the GPTQ layout; use 2, 3, 4 or 8")


def _stream_positions(bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """For the 32 values of one block of `bits` words: (word, shift, spills into next word)."""
    offsets = torch.arange(_WORD_BITS, dtype=torch.int64) * bits
    shift = offsets % _WORD_BITS
    return offsets // _WORD_BITS, shift, shift + bits > _WORD_BITS


def _to_int32(words: Tensor) -> Tensor:
    """Unsigned 32-bit words held in int64 -> int32 with the same bits."""
    return torch.where(words >= 1 << 31, words - (1 << _WORD_BITS), words).to(torch.int32)


def pack_along_rows(values: Tensor, bits: int) -> Tensor:
    """Pack integer codes `[n, m]` into int32 words `[n * bits // 32, m]` along dim 0.

    Args:
        values: integer tensor with entries in `[0, 2**bits - 1]`; `n` a multiple of 32.
        bits: 2, 3, 4 or 8.

    Returns:
        int32 tensor on the same device; row `r` holds stream bits `32 r .. 32 r + 31`.
    """
    check_bits(bits)
    if values.dim() != 2 or values.shape[0] % _WORD_BITS:
        raise MemtoolError(
            f"packing needs a 2-D tensor whose packed dimension is a multiple of 32, "
            f"got shape {tuple(values.shape)}"
        )
    if values.is_floating_point() or values.is_complex():
        raise MemtoolError(f"packing needs integer codes, got {values.dtype}")
    n, m = values.shape
    word, shift, spills = (t.to(values.device) for t in _stream_positions(bits))
    blocks = values.to(torch.int64).reshape(n // _WORD_BITS, _WORD_BITS, m)
    words = torch.zeros(n // _WORD_BITS, bits, m, dtype=torch.int64, device=values.device)
    # Fields never overlap, so adding contributions is the same as OR-ing them.
    low = (blocks << shift.view(1, -1, 1)) & _WORD_MASK
    words.index_add_(1, word, low)
    if bool(spills.any()):
        high = blocks[:, spills] >> (_WORD_BITS - shift[spills]).view(1, -1, 1)
        words.index_add_(1, word[spills] + 1, high)
    return _to_int32(words.reshape(n * bits // _WORD_BITS, m))


def unpack_along_rows(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of `pack_along_rows`: int32 words `[n * bits // 32, m]` -> int32 codes `[n, m]`."""
    check_bits(bits)
    if n % _WORD_BITS or packed.dim() != 2 or packed.shape[0] != n * bits // _WORD_BITS:
        raise MemtoolError(
            f"cannot unpack {n} {bits}-bit values from words of shape {tuple(packed.shape)}; "
            f"expected {n * bits // _WORD_BITS} packed rows and a multiple of 32 values"
        )
    m = packed.shape[1]
    word, shift, spills = (t.to(packed.device) for t in _stream_positions(bits))
    words = (packed.to(torch.int64) & _WORD_MASK).reshape(n // _WORD_BITS, bits, m)
    values = words[:, word] >> shift.view(1, -1, 1)
    if bool(spills.any()):
        # The high part of a split value sits at the bottom of the next word.
        high = words[:, word[spills] + 1] << (_WORD_BITS - shift[spills]).view(1, -1, 1)
        values[:, spills] |= high
    return (values & ((1 << bits) - 1)).reshape(n, m).to(torch.int32)


def pack_along_cols(values: Tensor, bits: int) -> Tensor:
    """Pack integer codes `[n, m]` into int32 words `[n, m * bits // 32]` along dim 1."""
    return pack_along_rows(values.t(), bits).t().contiguous()


def unpack_along_cols(packed: Tensor, bits: int, m: int) -> Tensor:
    """Inverse of `pack_along_cols`: int32 words `[n, m * bits // 32]` -> codes `[n, m]`."""
    return unpack_along_rows(packed.t(), bits, m).t().contiguous()


def _check_multiple_of_32(name: str, size: int) -> None:
    if size <= 0 or size % _WORD_BITS:
        raise MemtoolError(
            f"{name}={size} is not a positive multiple of 32; the GPTQ layout packs {name} into "
            f"32-bit words and cannot hold it (pad the layer or leave it unquantized)"
        )


def pack_gptq(
    q: Tensor, zeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int
) -> dict[str, Tensor]:
    """Pack codes, zero points, scales and group indices into GPTQ checkpoint tensors.

    The weight they describe is `W[i, o] = scales[g_idx[i], o] * (q[i, o] - zeros[g_idx[i], o])`.

    Args:
        q: integer codes `[in_features, out_features]` in `[0, 2**bits - 1]`.
        zeros: integer zero points `[n_groups, out_features]` in `[1, 2**bits]` (stored as
            `zero - 1`, so 0 cannot be stored).
        scales: float scales `[n_groups, out_features]`; stored as float16.
        g_idx: group of each input feature `[in_features]`, values in `[0, n_groups)`; any
            order (act-order checkpoints are not monotone).
        bits: 2, 3, 4 or 8.

    Returns:
        `{"qweight", "qzeros", "scales", "g_idx"}` as int32/int32/float16/int32 tensors.

    Raises:
        MemtoolError: unsupported bits, dims not multiples of 32, mismatched shapes, codes or
            zero points out of range, or g_idx naming a group that does not exist.
    """
    check_bits(bits)
    if q.dim() != 2:
        raise MemtoolError(f"q must be [in_features, out_features], got shape {tuple(q.shape)}")
    in_features, out_features = q.shape
    _check_multiple_of_32("in_features", in_features)
    _check_multiple_of_32("out_features", out_features)
    n_groups = zeros.shape[0] if zeros.dim() == 2 else -1
    if tuple(zeros.shape) != (n_groups, out_features) or scales.shape != zeros.shape:
        raise MemtoolError(
            f"zeros {tuple(zeros.shape)} and scales {tuple(scales.shape)} must both be "
            f"[n_groups, out_features={out_features}]"
        )
    if tuple(g_idx.shape) != (in_features,):
        raise MemtoolError(f"g_idx must have in_features={in_features} entries, got {g_idx.shape}")
    maxq = (1 << bits) - 1
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > maxq):
        raise MemtoolError(f"codes must lie in [0, {maxq}] for {bits} bits")
    if zeros.numel() and (int(zeros.min()) < 1 or int(zeros.max()) > maxq + 1):
        raise MemtoolError(
            f"zero points must lie in [1, {maxq + 1}] for {bits} bits: GPTQ checkpoints store "
            f"zero - 1, so a zero point of 0 cannot be stored"
        )
    if int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups:
        raise MemtoolError(f"g_idx values must lie in [0, {n_groups}), one per scale row")
    return {
        "qweight": pack_along_rows(q, bits),
        "qzeros": pack_along_cols(zeros.to(torch.int64) - 1, bits),
        "scales": scales.to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def check_gptq_tensors(
    qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int, in_features: int
) -> int:
    """Check GPTQ tensors against each other and `in_features`; return `out_features`.

    Raises:
        MemtoolError: naming the first tensor whose shape or dtype does not fit.
    """
    check_bits(bits)
    _check_multiple_of_32("in_features", in_features)
    if qweight.dim() != 2 or qweight.shape[0] != in_features * bits // _WORD_BITS:
        raise MemtoolError(
            f"qweight must be [in_features * bits // 32 = {in_features * bits // _WORD_BITS}, "
            f"out_features], got {tuple(qweight.shape)}"
        )
    out_features = qweight.shape[1]
    _check_multiple_of_32("out_features", out_features)
    if scales.dim() != 2 or scales.shape[1] != out_features:
        raise MemtoolError(f"scales must be [n_groups, {out_features}], got {tuple(scales.shape)}")
    n_groups = scales.shape[0]
    if tuple(qzeros.shape) != (n_groups, out_features * bits // _WORD_BITS):
        raise MemtoolError(
            f"qzeros must be [{n_groups}, {out_features * bits // _WORD_BITS}], "
            f"got {tuple(qzeros.shape)}"
        )
    if tuple(g_idx.shape) != (in_features,):
        raise MemtoolError(f"g_idx must have {in_features} entries, got {tuple(g_idx.shape)}")
    for name, tensor in (("qweight", qweight), ("qzeros", qzeros), ("g_idx", g_idx)):
        if tensor.dtype != torch.int32:
            raise MemtoolError(f"{name} must be int32, got {tensor.dtype}")
    return out_features


def unpack_gptq(
    tensors: dict[str, Tensor], bits: int, in_features: int, out_features: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Unpack GPTQ checkpoint tensors into codes, zero points, scales and group indices.

    Args:
        tensors: `{"qweight", "qzeros", "scales", "g_idx"}` as written by `pack_gptq` or read
            from a GPTQ checkpoint.
        bits: 2, 3, 4 or 8.
        in_features: input features of the layer (the packed row count is derived from it).
        out_features: output features of the layer.

    Returns:
        `(q, zeros, scales, g_idx)`: int32 codes `[in, out]`, int32 zero points
        `[n_groups, out]` with the stored `- 1` undone, the scales as stored, int32 g_idx.
    """
    missing = {"qweight", "qzeros", "scales", "g_idx"} - tensors.keys()
    if missing:
        raise MemtoolError(f"GPTQ tensors are missing {sorted(missing)}")
    qweight, qzeros = tensors["qweight"], tensors["qzeros"]
    scales, g_idx = tensors["scales"], tensors["g_idx"]
    found = check_gptq_tensors(qweight, qzeros, scales, g_idx, bits, in_features)
    if found != out_features:
        raise MemtoolError(f"qweight holds {found} output features, expected {out_features}")
    q = unpack_along_rows(qweight, bits, in_features)
    zeros = unpack_along_cols(qzeros, bits, out_features) + 1
    return q, zeros, scales, g_idx
