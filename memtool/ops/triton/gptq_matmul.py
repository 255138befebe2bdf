"""GPTQ `x @ W + bias` in Triton, straight from the packed words: a GEMV kernel for decode-sized
calls and a dequantize kernel feeding cuBLAS for the rest.

Specification: `memtool.ops.reference.gptq_linear` (and `dequantize_gptq` for the weight), over
the GPTQ checkpoint layout of `memtool.formats.gptq_pack`. Tests compare both paths with the
reference under `TRITON_INTERPRET=1` on CPU; `benchmarks/gpu_linear_kernels.py` on CUDA.

Why two kernels: on an H200 (BENCHMARKS.md, "GPU kernels") a fused tensor-core kernel that
dequantized a tile per K-step ran 25x slower than cuBLAS on the float16 weight at one row of a
4096 x 4096 layer, and 37x slower at 2048 rows, where each M-tile dequantized the whole weight
again; dequantizing once and calling cuBLAS took 2048 rows from 3427 us to 122 us (cuBLAS on
the float16 weight: 93 us). At one row the work is reading the packed weight once: the GEMV
kernel.

GEMV (`auto` at one row, 2/4/8 bits; see `use_gemv`): one program per (row, `BLOCK_N` output
columns, K-split).
For each `BLOCK_K` step it

1. loads the row's `BLOCK_K` activations;
2. for 2, 4 and 8 bits, loads the `BLOCK_K * bits / 32` packed words of each column once and
   unpacks every field with a shift (`words[:, None, :] >> [0, bits, 2 bits, ...]`), the layout
   being `bits`-wide fields from the low end of each word along K; 3-bit fields straddle words,
   so 3 bits loads each row's word (and the next) instead;
3. loads the step's `g_idx`; where every row is in one group (static groups: `BLOCK_K` divides
   the group size), loads that group's scale and zero point once per column, else (act-order
   checkpoints) per row and column;
4. accumulates `sum_k x[k] * scale * (q - zero)` in float32 (the integer difference is exact).

The K-splits (enough programs to keep every multiprocessor busy at one row) add their partial
sums into a float32 buffer atomically, so the summation order, not the result's precision, can
vary between runs.

Dequantize (more rows): one program per `BLOCK_K x BLOCK_N` tile writes `scale * (q - zero)`
in the activations' dtype (float32 stays float32, so float32 calls are IEEE float32 unless the
caller enabled TF32 matmuls in torch), then `torch.addmm` runs the product.

Precision: GEMV sums float32 products of the exact float32 weight for every activation dtype;
the dequantize path rounds `W` to the activations' dtype (half precision for float16/bfloat16),
as GPTQ kernels do, so results differ from the float32 reference by that rounding.

`triton` reads `TRITON_INTERPRET` when it is first imported (its own `tl.*` helpers are jitted
then) and again when this module is: set it before Python starts to run on CPU tensors.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from memtool.errors import MemtoolError
from memtool.formats.gptq_pack import check_gptq_tensors
from memtool.ops.reference import check_linear_inputs
from memtool.ops.triton.launch import ceil_div, check_launch
from memtool.ops.triton.tiles import Tiles, k_splits

# Rows up to which `auto` runs the GEMV kernel. Each GEMV row re-reads the packed weight, so its
# time grows with the rows (H200, 4096 x 4096, 4 bits: 49, 58, 89, 161 us at 1, 2, 4, 8 rows)
# while dequantize + cuBLAS stays near 41-47 us; at one row GEMV is within 20% at 4 bits and
# 1.8x faster at 2 bits. Those timings include ~40 us of per-call launch overhead on that
# machine (the SmolLM2-sized layers take as long), so kernel times proper are to be measured.
GEMV_MAX_ROWS = 1


def use_gemv(rows: int, bits: int, path: str = "auto") -> bool:
    """Whether a call of `rows` rows runs the GEMV kernel: `auto` picks it for single rows,
    except at 3 bits, whose per-row word loads made it 2.4x slower than dequantize + cuBLAS."""
    if path == "auto":
        return rows <= GEMV_MAX_ROWS and bits != 3
    return path == "gemv"


@triton.jit
def _unpack_field(base_ptr, offsets, next_word, shift, mask, BITS: tl.constexpr):
    """Extract `BITS`-bit fields at `shift` of the words at `base_ptr + offsets`."""
    word = tl.load(base_ptr + offsets, mask=mask, other=0).to(tl.uint32, bitcast=True)
    # uint32 so that `>>` is logical: an arithmetic shift would smear the sign bit into the
    # bits that the straddling 3-bit value takes from the next word.
    value = word >> shift.to(tl.uint32)
    if BITS == 3:
        spills = shift > 32 - BITS
        nxt = tl.load(base_ptr + offsets + next_word, mask=mask & spills, other=0)
        # (32 - shift) & 31 keeps the shift in range where nothing spills (nxt is 0 there).
        value = value | (nxt.to(tl.uint32, bitcast=True) << ((32 - shift) & 31).to(tl.uint32))
    return (value & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _codes(qweight_ptr, k0, offs_n, k_mask, n_mask, K, stride_qk, stride_qn,
           BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """The `BLOCK_K x BLOCK_N` int32 codes of rows `k0 + [0, BLOCK_K)`, columns `offs_n`.

    Rows outside `k_mask` may hold any code (callers zero their activations)."""
    if BITS == 3:  # an if/else, not an early return: Triton compiles code after a return
        offs_k = k0 + tl.arange(0, BLOCK_K)
        q_bit = offs_k * BITS
        codes = _unpack_field(
            qweight_ptr,
            (q_bit // 32)[:, None] * stride_qk + offs_n[None, :] * stride_qn,
            stride_qk,
            (q_bit % 32)[:, None],
            k_mask[:, None] & n_mask[None, :],
            BITS,
        )
    else:
        PER_WORD: tl.constexpr = 32 // BITS
        offs_w = k0 // PER_WORD + tl.arange(0, BLOCK_K // PER_WORD)
        w_mask = (offs_w < K * BITS // 32)[:, None] & n_mask[None, :]
        words = tl.load(
            qweight_ptr + offs_w[:, None] * stride_qk + offs_n[None, :] * stride_qn,
            mask=w_mask,
            other=0,
        ).to(tl.uint32, bitcast=True)
        shifts = (tl.arange(0, PER_WORD) * BITS).to(tl.uint32)
        fields = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
        codes = tl.reshape(fields, (BLOCK_K, BLOCK_N)).to(tl.int32)
    return codes


@triton.jit
def _dequantize_rows(q, group, qzeros_ptr, scales_ptr, offs_n, z_word, z_shift, kn_mask,
                     stride_zg, stride_zn, stride_sg, stride_sn, BITS: tl.constexpr):  # fmt: skip
    """`scale * (q - zero)` in float32 for codes `q` whose rows have groups `group` (any order):
    each row's scale and zero point gathered per column. Checkpoints store zero - 1."""
    zero = _unpack_field(qzeros_ptr, group[:, None] * stride_zg + z_word[None, :], stride_zn,
                         z_shift[None, :], kn_mask, BITS)  # fmt: skip
    s_offs = group[:, None] * stride_sg + offs_n[None, :] * stride_sn
    scale = tl.load(scales_ptr + s_offs, mask=kn_mask, other=0.0).to(tl.float32)
    return scale * (q - zero - 1).to(tl.float32)


@triton.jit
def _gptq_gemv_kernel(
    x_ptr,
    qweight_ptr,
    qzeros_ptr,
    scales_ptr,
    g_idx_ptr,
    bias_ptr,
    out_ptr,
    N,
    K,
    K_SPLIT,
    stride_xm,
    stride_xk,
    stride_qk,
    stride_qn,
    stride_zg,
    stride_zn,
    stride_sg,
    stride_sn,
    stride_om,
    stride_on,
    BITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ATOMIC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    # Where each output column's zero point sits in a qzeros row: fixed for the whole K loop.
    z_bit = offs_n * BITS
    z_word = (z_bit // 32) * stride_zn
    z_shift = z_bit % 32

    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    k_begin = pid_k * K_SPLIT
    k_end = tl.minimum(k_begin + K_SPLIT, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        kn_mask = k_mask[:, None] & n_mask[None, :]
        x = tl.load(x_ptr + row * stride_xm + offs_k * stride_xk, mask=k_mask, other=0.0)
        q = _codes(qweight_ptr, k0, offs_n, k_mask, n_mask, K, stride_qk, stride_qn,
                   BITS, BLOCK_K, BLOCK_N)  # fmt: skip
        # Rows past the end take the step's first group, so they never make a step look mixed
        # (their activations are 0).
        first = tl.load(g_idx_ptr + k0)
        group = tl.where(k_mask, tl.load(g_idx_ptr + offs_k, mask=k_mask, other=0), first)
        if tl.min(group, axis=0) == tl.max(group, axis=0):
            # Names differ from the else branch's: Triton wants a name's type alike in both.
            scale_row = tl.load(scales_ptr + first * stride_sg + offs_n * stride_sn, mask=n_mask,
                                other=0.0).to(tl.float32)  # fmt: skip
            zero_row = _unpack_field(qzeros_ptr, first * stride_zg + z_word, stride_zn, z_shift,
                                     n_mask, BITS)  # fmt: skip
            # Checkpoints store zero - 1 (GPTQ "v1").
            diff = (q - (zero_row + 1)[None, :]).to(tl.float32)
            acc += scale_row * tl.sum(x.to(tl.float32)[:, None] * diff, axis=0)
        else:
            w = _dequantize_rows(
                q, group, qzeros_ptr, scales_ptr, offs_n, z_word, z_shift, kn_mask,
                stride_zg, stride_zn, stride_sg, stride_sn, BITS,
            )  # fmt: skip
            acc += tl.sum(x.to(tl.float32)[:, None] * w, axis=0)

    if HAS_BIAS:  # added once: by the first K-split
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)
    out = out_ptr + row * stride_om + offs_n * stride_on
    if ATOMIC:
        tl.atomic_add(out, acc, mask=n_mask)
    else:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _gptq_dequant_kernel(
    qweight_ptr,
    qzeros_ptr,
    scales_ptr,
    g_idx_ptr,
    w_ptr,
    N,
    K,
    stride_qk,
    stride_qn,
    stride_zg,
    stride_zn,
    stride_sg,
    stride_sn,
    stride_wk,
    stride_wn,
    BITS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_mask = offs_k < K
    n_mask = offs_n < N
    kn_mask = k_mask[:, None] & n_mask[None, :]
    k0 = tl.program_id(0) * BLOCK_K
    q = _codes(qweight_ptr, k0, offs_n, k_mask, n_mask, K, stride_qk, stride_qn,
               BITS, BLOCK_K, BLOCK_N)  # fmt: skip
    group = tl.load(g_idx_ptr + offs_k, mask=k_mask, other=0)
    z_bit = offs_n * BITS
    z_word, z_shift = (z_bit // 32) * stride_zn, z_bit % 32
    w = _dequantize_rows(
        q, group, qzeros_ptr, scales_ptr, offs_n, z_word, z_shift, kn_mask,
        stride_zg, stride_zn, stride_sg, stride_sn, BITS,
    )  # fmt: skip
    w_offs = offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    tl.store(w_ptr + w_offs, w.to(w_ptr.dtype.element_ty), mask=kn_mask)


def _pow2_at_most(value: int) -> int:
    return 1 << (max(value, 1).bit_length() - 1)


def default_gemv_tiles(n: int, k: int, n_groups: int) -> Tiles:
    """GEMV tiles: `BLOCK_K` the largest power of two up to 128 within a group (so that steps
    of static-group checkpoints see one group), 64 columns per program."""
    block_k = max(16, min(128, _pow2_at_most(-(-k // max(n_groups, 1)))))
    return Tiles(1, 64 if n >= 64 else 32, block_k)


def triton_dequantize_gptq(
    qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int, in_features: int,
    dtype: torch.dtype = torch.float32,
) -> Tensor:  # fmt: skip
    """`memtool.ops.reference.dequantize_gptq` in one Triton pass, returned in `dtype`."""
    out_features = check_gptq_tensors(qweight, qzeros, scales, g_idx, bits, in_features)
    return _dequantize(qweight, qzeros, scales, g_idx, bits, in_features, out_features, dtype)


def _dequantize(qweight, qzeros, scales, g_idx, bits, in_features, out_features, dtype) -> Tensor:
    """The dequantize launch, the tensors already checked (once per call, by the caller)."""
    w = torch.empty(in_features, out_features, dtype=dtype, device=qweight.device)
    block_k, block_n = 32, 64
    grid = (ceil_div(in_features, block_k), ceil_div(out_features, block_n))
    if in_features and out_features:
        _gptq_dequant_kernel[grid](
            qweight, qzeros, scales, g_idx, w, out_features, in_features,
            qweight.stride(0), qweight.stride(1), qzeros.stride(0), qzeros.stride(1),
            scales.stride(0), scales.stride(1), w.stride(0), w.stride(1),
            BITS=bits, BLOCK_K=block_k, BLOCK_N=block_n,
        )  # fmt: skip
    return w


def triton_gptq_linear(
    x: Tensor,
    qweight: Tensor,
    qzeros: Tensor,
    scales: Tensor,
    g_idx: Tensor,
    bits: int,
    in_features: int,
    bias: Tensor | None = None,
    *,
    path: str = "auto",
    tiles: Tiles | None = None,
) -> Tensor:
    """`x @ W + bias` for a GPTQ-packed `W`: the GEMV kernel or dequantize + cuBLAS.

    Same contract as `memtool.ops.reference.gptq_linear`. `g_idx` values are not range-checked
    here (that would cost a device sync per call); `pack_gptq` checks them when packing.

    Args:
        x: activations `[..., in_features]`, float16, bfloat16 or float32, on CUDA (or on CPU
            with `TRITON_INTERPRET=1` set before this module was imported).
        qweight, qzeros, scales, g_idx, bits, in_features: as in `dequantize_gptq`.
        bias: optional `[out_features]`.
        path: `auto` (see `use_gemv`), or `gemv` or `dequant` to force one (benchmarks, tests).
        tiles: the GEMV's tiles (`block_m` unused: one row per program); None picks
            `default_gemv_tiles`.

    Returns:
        `[..., out_features]` in `x.dtype`.
    """
    out_features = check_gptq_tensors(qweight, qzeros, scales, g_idx, bits, in_features)
    check_linear_inputs(x, bias, qweight, in_features, out_features)
    check_launch("GPTQ", x, qweight, {"qzeros": qzeros, "scales": scales, "g_idx": g_idx})
    if path not in ("auto", "gemv", "dequant"):
        raise MemtoolError(f"unknown GPTQ kernel path {path!r}; use auto, gemv or dequant")
    x2 = x.reshape(-1, in_features)
    m = x2.shape[0]
    if not use_gemv(m, bits, path):
        w = _dequantize(qweight, qzeros, scales, g_idx, bits, in_features, out_features, x.dtype)
        out = torch.addmm(bias.to(x.dtype), x2, w) if bias is not None else x2 @ w
        return out.reshape(*x.shape[:-1], out_features)
    out = _gemv(x2, qweight, qzeros, scales, g_idx, bits, bias, out_features, tiles)
    return out.reshape(*x.shape[:-1], out_features)


def _gemv(x2, qweight, qzeros, scales, g_idx, bits, bias, out_features, tiles) -> Tensor:
    m, k = x2.shape
    tiles = tiles or default_gemv_tiles(out_features, k, scales.shape[0])
    n_tiles = ceil_div(out_features, tiles.block_n)
    splits, steps_per_split = k_splits(m * n_tiles, k, tiles.block_k, x2.device)
    atomic = splits > 1
    if atomic:
        out = torch.zeros(m, out_features, dtype=torch.float32, device=x2.device)
    else:
        out = torch.empty(m, out_features, dtype=x2.dtype, device=x2.device)
    if m and out_features and k:
        _gptq_gemv_kernel[(m, n_tiles, splits)](
            x2, qweight, qzeros, scales, g_idx,
            bias if bias is not None else out,  # never read without HAS_BIAS
            out, out_features, k, steps_per_split * tiles.block_k,
            x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1),
            qzeros.stride(0), qzeros.stride(1), scales.stride(0), scales.stride(1),
            out.stride(0), out.stride(1),
            BITS=bits, HAS_BIAS=bias is not None, ATOMIC=atomic,
            BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, num_warps=tiles.num_warps,
        )  # fmt: skip
    elif bias is not None and m:
        out += bias.to(out.dtype)  # K = 0: the product is the bias alone
    return out.to(x2.dtype) if atomic else out
