"""Activation packing in Triton: bfloat16 rounding and per-row int8 quantisation, both ways.

Specification: `memtool.ops.reference_train.pack_activation_reference` and
`unpack_activation_reference`; tests compare these kernels with them under `TRITON_INTERPRET=1`
on CPU, and `benchmarks/gpu_train_kernels.py` on CUDA.

Kernels:

- `_convert_kernel`: a flat elementwise cast, float32/float16/bfloat16 to bfloat16 (packing)
  or bfloat16 to float32/float16 (unpacking).
- `_int8_pack_kernel`: a program owns `BLOCK_R` whole rows and walks them in `BLOCK_C`-wide
  column tiles twice: once for the row absmax, once to quantise (the second read mostly hits
  L2 for activation-sized rows).
- `_int8_unpack_kernel`: the same tiling, `q * scale` per element.

bfloat16 travels as its int16 bit pattern, and the rounding to it is integer arithmetic on the
float32 bits (`fp32_to_bf16_bits`), not a cast. Two reasons: the Triton interpreter truncates
float32 to bfloat16 where the GPU rounds to nearest even, so bit arithmetic is the one way the
CPU tests check the rounding exactly; and it needs no bfloat16 conversion instruction (sm_80+),
for a few integer operations per element in kernels bound by memory traffic. Divisions use
`tl.div_rn`: Triton's `/` on float32 lowers to the approximate `div.full.f32` on NVIDIA GPUs
(triton-lang/triton#10661), which would break exact agreement of scales and quantised values
with the reference. Rounding half to even is the float32 "magic
number" idiom `(v + 1.5 * 2**23) - 1.5 * 2**23`, exact for |v| < 2**22 (here |v| <= 127 after
clamping), since the interpreter has no libdevice `rint`; kernels are compiled with
`enable_fp_fusion=False` so that no add is fused into a neighbouring multiply.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from memtool.errors import MemtoolError
from memtool.ops import triton_interpreting
from memtool.ops.reference_train import (
    INT8_MAX,
    Packed,
    check_pack_input,
    check_packed,
    row_count,
)
from memtool.ops.triton.launch import ceil_div, next_power_of_2

_FLAT_BLOCK = 1024
_TILE_ELEMENTS = 4096  # BLOCK_R * BLOCK_C of the int8 kernels
_MAX_BLOCK_C = 2048
# Globals a kernel reads must be constexpr.
_QMAX = tl.constexpr(float(INT8_MAX))
_RNE_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: adding and subtracting it rounds half even


@triton.jit
def fp32_to_bf16_bits(x):
    """Round float32 `x` to bfloat16, to nearest with ties to even; returns int16 bit patterns.

    Adds 0x7FFF plus the lowest kept bit to the float32 bits and drops the low 16: a carry
    rounds up past halfway, and at exactly halfway only when the kept bits are odd. The carry
    runs into the exponent where it should (to infinity above the largest bfloat16). NaN becomes
    the quiet NaN 0x7FC0; only NaN-ness is specified (torch's own payloads vary by device).
    """
    bits = x.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    return tl.where(is_nan, 0x7FC0, rounded).to(tl.int16)


@triton.jit
def bf16_bits_to_fp32(bits):
    """Widen int16 bfloat16 bit patterns to float32 (exact: the bits become the high half)."""
    return ((bits.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _load_fp32(ptr, offs, mask, SRC_BF16: tl.constexpr):
    if SRC_BF16:
        return bf16_bits_to_fp32(tl.load(ptr + offs, mask=mask, other=0))
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_fp32(ptr, offs, value, mask, DST_BF16: tl.constexpr):
    if DST_BF16:
        tl.store(ptr + offs, fp32_to_bf16_bits(value), mask=mask)
    else:
        # float32 stores as is; float16 rounds to nearest even, on the GPU and interpreter alike.
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _convert_kernel(
    src_ptr, dst_ptr, n, SRC_BF16: tl.constexpr, DST_BF16: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    _store_fp32(dst_ptr, offs, _load_fp32(src_ptr, offs, mask, SRC_BF16), mask, DST_BF16)


@triton.jit
def _int8_pack_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    n_rows,
    n_cols,
    SRC_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    row_start = rows.to(tl.int64) * n_cols

    absmax = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, n_cols, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        offs = row_start[:, None] + cols[None, :]
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        x = _load_fp32(x_ptr, offs, mask, SRC_BF16)  # masked lanes load 0: no effect on max
        absmax = tl.maximum(absmax, tl.max(tl.abs(x), axis=1))
    scale = tl.div_rn(absmax, _QMAX)
    scale = tl.where(scale == 0.0, 1.0, scale)  # a zero row: any scale unpacks to zeros
    tl.store(scale_ptr + rows, scale, mask=row_mask)

    for c0 in range(0, n_cols, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        offs = row_start[:, None] + cols[None, :]
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        x = _load_fp32(x_ptr, offs, mask, SRC_BF16)
        v = tl.div_rn(x, scale[:, None])
        # Clamping before rounding equals rounding before clamping: the bounds are integers.
        v = tl.minimum(tl.maximum(v, -_QMAX), _QMAX)
        q = (v + _RNE_MAGIC) - _RNE_MAGIC
        tl.store(q_ptr + offs, q.to(tl.int8), mask=mask)


@triton.jit
def _int8_unpack_kernel(
    q_ptr,
    scale_ptr,
    out_ptr,
    n_rows,
    n_cols,
    DST_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    row_start = rows.to(tl.int64) * n_cols
    scale = tl.load(scale_ptr + rows, mask=row_mask, other=1.0)
    for c0 in range(0, n_cols, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        offs = row_start[:, None] + cols[None, :]
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        q = tl.load(q_ptr + offs, mask=mask, other=0)
        _store_fp32(out_ptr, offs, q.to(tl.float32) * scale[:, None], mask, DST_BF16)


def check_triton_device(kernel: str, tensor: Tensor) -> None:
    """Raise `MemtoolError` unless Triton can run `kernel` (a name for messages) on `tensor`."""
    if tensor.device.type == "cpu" and not triton_interpreting():
        raise MemtoolError(
            f"the Triton {kernel} kernel needs CUDA tensors, or CPU tensors with the interpreter: "
            "set TRITON_INTERPRET=1 before Python starts"
        )


def as_kernel_tensor(t: Tensor) -> Tensor:
    """bfloat16 as its int16 bits (see the module docstring); other dtypes as they are."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def _convert(src: Tensor, dtype: torch.dtype) -> Tensor:
    """`src` (contiguous) cast to `dtype`, one of them bfloat16, as a new contiguous tensor."""
    dst = torch.empty(src.shape, dtype=dtype, device=src.device)
    n = src.numel()
    if n:
        _convert_kernel[(ceil_div(n, _FLAT_BLOCK),)](
            as_kernel_tensor(src),
            as_kernel_tensor(dst),
            n,
            SRC_BF16=src.dtype == torch.bfloat16,
            DST_BF16=dtype == torch.bfloat16,
            BLOCK=_FLAT_BLOCK,
            enable_fp_fusion=False,
        )
    return dst


def _row_blocks(rows: int, cols: int) -> tuple[int, int]:
    """Column tile up to 2048 wide; as many rows as fill a 4096-element tile (short rows)."""
    block_c = min(next_power_of_2(max(cols, 1)), _MAX_BLOCK_C)
    block_r = min(_TILE_ELEMENTS // block_c, next_power_of_2(max(rows, 1)))
    return block_r, block_c


def triton_pack_activation(x: Tensor, fmt: str) -> Packed:
    """Pack `x` as `fmt` with the Triton kernels; same contract as the reference.

    Args:
        x: float32/float16/bfloat16, any shape and strides, on CUDA (or on CPU with
            `TRITON_INTERPRET=1` set before triton was imported).
        fmt: `"bf16"` or `"int8"`.
    """
    check_pack_input(x, fmt)
    check_triton_device("activation pack", x)
    if fmt == "bf16":
        if x.dtype == torch.bfloat16:  # a plain copy: torch's is already one memory-bound pass
            data = x.clone(memory_format=torch.contiguous_format)
        else:
            data = _convert(x.contiguous(), torch.bfloat16)
        return Packed("bf16", data, None, x.shape, x.dtype)
    rows, cols = row_count(x.shape)
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scales = torch.ones(x.shape[:-1], dtype=torch.float32, device=x.device)
    if rows and cols:
        block_r, block_c = _row_blocks(rows, cols)
        _int8_pack_kernel[(ceil_div(rows, block_r),)](
            as_kernel_tensor(x.contiguous()),
            q,
            scales,
            rows,
            cols,
            SRC_BF16=x.dtype == torch.bfloat16,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            enable_fp_fusion=False,
        )
    return Packed("int8", q, scales, x.shape, x.dtype)


def triton_unpack_activation(packed: Packed) -> Tensor:
    """Restore a packed activation with the Triton kernels; same contract as the reference."""
    check_packed(packed)
    check_triton_device("activation unpack", packed.data)
    if packed.fmt == "bf16":
        if packed.dtype == torch.bfloat16:
            return packed.data.clone()
        return _convert(packed.data, packed.dtype)
    rows, cols = row_count(packed.shape)
    out = torch.empty(packed.shape, dtype=packed.dtype, device=packed.data.device)
    if rows and cols:
        block_r, block_c = _row_blocks(rows, cols)
        _int8_unpack_kernel[(ceil_div(rows, block_r),)](
            packed.data,
            packed.scales,
            as_kernel_tensor(out),
            rows,
            cols,
            DST_BF16=packed.dtype == torch.bfloat16,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            enable_fp_fusion=False,
        )
    return out
