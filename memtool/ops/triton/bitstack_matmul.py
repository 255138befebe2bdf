"""Fused BitStack reconstruct-and-matmul in Triton: `x @ Wᵀ + bias` from signs and factors.

Specification: `memtool.ops.reference.bitstack_linear` (and `bitstack_reconstruct` for the
weight), over the sign layout of `memtool.formats.bitstack_pack`: `W = Σ_j S_j ⊙ (u_j v_jᵀ)`
with `S_j` packed one bit per weight. The kernel never materialises `W`; tests compare it with
the reference under `TRITON_INTERPRET=1` on CPU.

Tiling: one program computes a `BLOCK_M x BLOCK_N` tile of the output (tokens x out-features)
and walks the input dimension in steps of `BLOCK_K`. For each K-step it

1. loads the `BLOCK_M x BLOCK_K` activation tile;
2. for each block j: loads the `BLOCK_K x RANK` rows of `v_j` and the `RANK x BLOCK_N` columns
   of `u_jᵀ` and forms the magnitude tile `v_j u_jᵀ` (that is `(u_j v_jᵀ)ᵀ`) with `tl.dot`;
   loads the packed sign byte of each weight (byte `k // 8` of row n, bit `k % 8`; rows of a
   byte load the same address, which the cache serves) and adds the magnitude, negated where
   the bit is set, to a float32 weight tile;
3. accumulates `tl.dot(x_tile, w_tile)` in float32, the weight tile being `Wᵀ` already.

The rank is padded to `BLOCK_R`, the next power of two of at least 16 (the smallest inner
dimension `tl.dot` takes), with masked loads returning 0 beyond the rank, so the padding adds
exact zeros. A dot rather than a static loop of rank-1 outer products: it runs on tensor cores,
while the loop would cost RANK vector FMAs per weight per block on CUDA cores, which dominates
for decode-sized M, and it is one op per block in the interpreter instead of RANK.

Precision: float16 factors (the checkpoint dtype) go to the magnitude dot as they are: products
of two float16 values are exact in float32 and the dot accumulates in float32. Factors of any
other float dtype are widened to float32 first and dotted in IEEE float32 (no TF32). Either way
the weight tile is the reference's float32 `W` up to summation order. The output accumulator is
always float32. For float32 activations the main dot runs in IEEE float32, matching the
reference to ~1e-6 relative. For float16/bfloat16 activations the float32 weight tile is
rounded to the activation dtype before the dot (tensor cores), so results differ from the
reference by the half-precision rounding of `W`.

`triton` reads `TRITON_INTERPRET` when it is first imported (its own `tl.*` helpers are jitted
then) and again when this module is: set it before Python starts to run on CPU tensors.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from memtool.errors import MemtoolError
from memtool.ops.reference import check_bitstack_tensors, check_linear_inputs
from memtool.ops.triton.launch import check_launch
from memtool.ops.triton.tiles import Tiles, default_tiles, dot_accumulate, store_output


@triton.jit
def _bitstack_matmul_kernel(
    x_ptr,
    signs_ptr,
    u_ptr,
    v_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    BLOCKS,
    RANK,
    stride_xm,
    stride_xk,
    stride_sj,
    stride_sn,
    stride_sc,
    stride_uj,
    stride_un,
    stride_ur,
    stride_vj,
    stride_vk,
    stride_vr,
    stride_om,
    stride_on,
    HAS_BIAS: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    FACTORS_FP16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask = offs_m < M
    n_mask = offs_n < N
    r_mask = offs_r < RANK
    # The u_jᵀ tile [BLOCK_R, BLOCK_N] of this program's out-features: fixed for the K loop.
    u_offs = offs_r[:, None] * stride_ur + offs_n[None, :] * stride_un
    u_mask = r_mask[:, None] & n_mask[None, :]

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
        v_offs = offs_k[:, None] * stride_vk + offs_r[None, :] * stride_vr
        v_mask = k_mask[:, None] & r_mask[None, :]
        # Input k of out-feature n: bit k % 8 of byte k // 8 in row n (set = negative).
        s_offs = (offs_k // 8)[:, None] * stride_sc + offs_n[None, :] * stride_sn
        s_shift = (offs_k % 8)[:, None]

        w = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)  # Wᵀ for this K-step
        for j in range(0, BLOCKS):
            # Masked factors load 0: rank padding, ragged K and N all add exact zeros.
            v = tl.load(v_ptr + j * stride_vj + v_offs, mask=v_mask, other=0.0)
            u = tl.load(u_ptr + j * stride_uj + u_offs, mask=u_mask, other=0.0)
            if FACTORS_FP16:
                magnitude = tl.dot(v, u)  # float16 products are exact in float32
            else:
                magnitude = tl.dot(v.to(tl.float32), u.to(tl.float32), input_precision="ieee")
            byte = tl.load(signs_ptr + j * stride_sj + s_offs, mask=kn_mask, other=0)
            negative = ((byte.to(tl.int32) >> s_shift) & 1) != 0
            w += tl.where(negative, -magnitude, magnitude)

        acc = dot_accumulate(acc, x, w, IEEE_FP32)

    store_output(
        acc, bias_ptr, out_ptr, offs_m, offs_n, m_mask, n_mask, stride_om, stride_on, HAS_BIAS
    )


def triton_bitstack_linear(
    x: Tensor,
    signs: Tensor,
    u: Tensor,
    v: Tensor,
    in_features: int,
    bias: Tensor | None = None,
    *,
    tiles: Tiles | None = None,
) -> Tensor:
    """`x @ Wᵀ + bias` for the BitStack weight `W = Σ_j S_j ⊙ (u_j v_jᵀ)`, in one Triton kernel.

    Same contract as `memtool.ops.reference.bitstack_linear`.

    Args:
        x: activations `[..., in_features]`, float16, bfloat16 or float32, on CUDA (or on CPU
            with `TRITON_INTERPRET=1` set before this module was imported).
        signs: uint8 `[blocks, out_features, ceil(in_features / 8)]`.
        u: float `[blocks, out_features, rank]` (float16 in checkpoints).
        v: float `[blocks, in_features, rank]`.
        in_features: input features (the packed width rounds up to 8).
        bias: optional `[out_features]`.
        tiles: the launch's tile shape; None picks `default_tiles` for the call's shape.

    Returns:
        `[..., out_features]` in `x.dtype`.
    """
    check_bitstack_tensors(signs, u, v, in_features)
    out_features = signs.shape[1]
    check_linear_inputs(x, bias, signs, in_features, out_features)
    for name, tensor in (("u", u), ("v", v)):
        if not tensor.is_floating_point():
            raise MemtoolError(f"{name} must be a float tensor, got {tensor.dtype}")
    check_launch("BitStack", x, signs, {"u": u, "v": v})
    x2 = x.reshape(-1, in_features)
    m = x2.shape[0]
    blocks, _, rank = u.shape
    out = torch.empty(m, out_features, dtype=x.dtype, device=x.device)
    if m > 0 and out_features > 0:
        tiles = tiles or default_tiles(m, out_features, in_features)
        # The rank padded for `tl.dot`, whose inner dimension is at least 16.
        block_r = max(16, triton.next_power_of_2(max(rank, 1)))
        grid = (triton.cdiv(m, tiles.block_m), triton.cdiv(out_features, tiles.block_n))
        _bitstack_matmul_kernel[grid](
            x2,
            signs,
            u,
            v,
            bias if bias is not None else out,  # never read without HAS_BIAS
            out,
            m,
            out_features,
            in_features,
            blocks,
            rank,
            x2.stride(0),
            x2.stride(1),
            signs.stride(0),
            signs.stride(1),
            signs.stride(2),
            u.stride(0),
            u.stride(1),
            u.stride(2),
            v.stride(0),
            v.stride(1),
            v.stride(2),
            out.stride(0),
            out.stride(1),
            HAS_BIAS=bias is not None,
            IEEE_FP32=x.dtype == torch.float32,
            FACTORS_FP16=u.dtype == torch.float16 and v.dtype == torch.float16,
            BLOCK_M=tiles.block_m,
            BLOCK_N=tiles.block_n,
            BLOCK_K=tiles.block_k,
            BLOCK_R=block_r,
            num_warps=tiles.num_warps,
        )
    return out.reshape(*x.shape[:-1], out_features)
