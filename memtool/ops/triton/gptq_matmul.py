"""Fused GPTQ dequantize-and-matmul in Triton: `x @ W + bias` straight from the packed words.

Specification: `memtool.ops.reference.gptq_linear` (and `dequantize_gptq` for the weight),
over the GPTQ checkpoint layout of `memtool.formats.gptq_pack`. The kernel never materialises
`W`; tests compare it with the reference under `TRITON_INTERPRET=1` on CPU.

Tiling: one program computes a `BLOCK_M x BLOCK_N` tile of the output and walks K in steps of
`BLOCK_K`. For each K-step it

1. loads the `BLOCK_M x BLOCK_K` activation tile;
2. for each row k of the tile, loads the int32 word holding bit `k * bits` of column n's
   stream (row `k * bits // 32` of `qweight`) and, for 3 bits only, the next word too, because
   one value in every 32/3 straddles two words; shifts (logically, as uint32) and masks out the
   code. Rows sharing a word load the same address, which the cache serves;
3. looks up the row's group `g_idx[k]` (any order: act-order checkpoints are honoured as given)
   and gathers that group's scale and zero point (the zero point unpacked the same way from
   `qzeros`, along N, plus one);
4. forms `scale * (q - zero)` and accumulates `tl.dot(x_tile, w_tile)` in float32.

Precision: the accumulator is always float32. For float32 activations the dot runs in IEEE
float32 (no TF32), matching the reference to ~1e-5 relative. For float16/bfloat16 activations
the dequantized tile is rounded to the activation dtype before the dot (tensor cores), as GPTQ
kernels do, so results differ from the float32 reference by the half-precision rounding of `W`.

`triton` reads `TRITON_INTERPRET` when it is first imported (its own `tl.*` helpers are jitted
then) and again when this module is: set it before Python starts to run on CPU tensors.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from memtool.formats.gptq_pack import check_gptq_tensors
from memtool.ops.reference import check_linear_inputs
from memtool.ops.triton.launch import check_launch
from memtool.ops.triton.tiles import Tiles, default_tiles, dot_accumulate, store_output


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
def _gptq_matmul_kernel(
    x_ptr,
    qweight_ptr,
    qzeros_ptr,
    scales_ptr,
    g_idx_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
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
    IEEE_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    # Where each output column's zero point sits in a qzeros row: fixed for the whole K loop.
    z_bit = offs_n * BITS
    z_word = (z_bit // 32)[None, :] * stride_zn
    z_shift = (z_bit % 32)[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        kn_mask = k_mask[:, None] & n_mask[None, :]
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        q_bit = offs_k * BITS
        q = _unpack_field(
            qweight_ptr,
            (q_bit // 32)[:, None] * stride_qk + offs_n[None, :] * stride_qn,
            stride_qk,
            (q_bit % 32)[:, None],
            kn_mask,
            BITS,
        )
        group = tl.load(g_idx_ptr + offs_k, mask=k_mask, other=0)
        zero = _unpack_field(
            qzeros_ptr, group[:, None] * stride_zg + z_word, stride_zn, z_shift, kn_mask, BITS
        )
        scale = tl.load(
            scales_ptr + group[:, None] * stride_sg + offs_n[None, :] * stride_sn,
            mask=kn_mask,
            other=0.0,
        ).to(tl.float32)
        # Checkpoints store zero - 1 (GPTQ "v1"); masked rows get scale 0, so w is 0 there.
        w = scale * (q - zero - 1).to(tl.float32)
        acc = dot_accumulate(acc, x, w, IEEE_FP32)

    store_output(
        acc, bias_ptr, out_ptr, offs_m, offs_n, m_mask, n_mask, stride_om, stride_on, HAS_BIAS
    )


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
    tiles: Tiles | None = None,
) -> Tensor:
    """`x @ W + bias` for a GPTQ-packed `W`, fused in one Triton kernel.

    Same contract as `memtool.ops.reference.gptq_linear`. `g_idx` values are not range-checked
    here (that would cost a device sync per call); `pack_gptq` checks them when packing.

    Args:
        x: activations `[..., in_features]`, float16, bfloat16 or float32, on CUDA (or on CPU
            with `TRITON_INTERPRET=1` set before this module was imported).
        qweight, qzeros, scales, g_idx, bits, in_features: as in `dequantize_gptq`.
        bias: optional `[out_features]`.
        tiles: the launch's tile shape; None picks `default_tiles` for the call's shape.

    Returns:
        `[..., out_features]` in `x.dtype`.
    """
    out_features = check_gptq_tensors(qweight, qzeros, scales, g_idx, bits, in_features)
    check_linear_inputs(x, bias, qweight, in_features, out_features)
    check_launch("GPTQ", x, qweight, {"qzeros": qzeros, "scales": scales, "g_idx": g_idx})
    x2 = x.reshape(-1, in_features)
    m = x2.shape[0]
    out = torch.empty(m, out_features, dtype=x.dtype, device=x.device)
    if m > 0:
        tiles = tiles or default_tiles(m, out_features, in_features)
        grid = (triton.cdiv(m, tiles.block_m), triton.cdiv(out_features, tiles.block_n))
        _gptq_matmul_kernel[grid](
            x2,
            qweight,
            qzeros,
            scales,
            g_idx,
            bias if bias is not None else out,  # never read without HAS_BIAS
            out,
            m,
            out_features,
            in_features,
            x2.stride(0),
            x2.stride(1),
            qweight.stride(0),
            qweight.stride(1),
            qzeros.stride(0),
            qzeros.stride(1),
            scales.stride(0),
            scales.stride(1),
            out.stride(0),
            out.stride(1),
            BITS=bits,
            HAS_BIAS=bias is not None,
            IEEE_FP32=x.dtype == torch.float32,
            BLOCK_M=tiles.block_m,
            BLOCK_N=tiles.block_n,
            BLOCK_K=tiles.block_k,
            num_warps=tiles.num_warps,
        )
    return out.reshape(*x.shape[:-1], out_features)
