"""Fused BitStack reconstruct-and-matmul in Triton: `x @ Wᵀ + bias` from signs and factors.

Specification: `memtool.ops.reference.bitstack_linear` (and `bitstack_reconstruct` for the
weight), over the sign layout of `memtool.formats.bitstack_pack`: `W = Σ_j S_j ⊙ (u_j v_jᵀ)`
with `S_j` packed one bit per weight. For decode-sized calls (at most `FUSED_MAX_ROWS` rows) the
fused kernel never materialises `W`; larger calls reconstruct `Wᵀ` once in the activations'
dtype (`triton_bitstack_reconstruct_t`, the same weight tiles) and hand it to torch's matmul,
as the issue's "whichever is faster for the shape and batch" asks: rebuilding every weight tile
for each tile of rows costs more than one pass over `W`. Tests compare both with the reference
under `TRITON_INTERPRET=1` on CPU.

Tiling: one program computes a `BLOCK_M x BLOCK_N` tile of the output (tokens x out-features)
and walks the input dimension in steps of `BLOCK_K`. For each K-step it

1. loads the `BLOCK_M x BLOCK_K` activation tile;
2. for each block j: loads the `BLOCK_K x RANK` rows of `v_j` and the `RANK x BLOCK_N` columns
   of `u_jᵀ` and forms the magnitude tile `v_j u_jᵀ` (that is `(u_j v_jᵀ)ᵀ`) with `tl.dot`;
   loads the packed sign byte of each weight (byte `k // 8` of row n, bit `k % 8`; rows of a
   byte load the same address, which the cache serves) and adds the magnitude, negated where
   the bit is set, to a float32 weight tile;
3. accumulates `tl.dot(x_tile, w_tile)` in float32, the weight tile being `Wᵀ` already.

Where the output gives too few tiles to keep the GPU busy (decode: one row, a few hundred
columns), K is split over programs too (`memtool.ops.triton.tiles.k_splits`), whose float32
partial sums are added atomically: the summation order, not the precision, can vary by run.

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
from memtool.ops.triton.launch import ceil_div, check_launch, next_power_of_2
from memtool.ops.triton.tiles import (
    Tiles,
    default_tiles,
    dot_accumulate,
    k_splits,
    store_output,
)

# Rows up to which `auto` runs the fused kernel; above, reconstruct Wᵀ once and call torch's
# matmul. The fused kernel rebuilds every weight tile for each tile of rows: on an H200 at 2048
# rows of a 4096 x 4096 layer it took 2172 us, reconstruct + cuBLAS 162 us (cuBLAS on the float16
# weight: 94 us). At one row fused took 84 us, reconstruct 122; at 4 rows 165 and 138.
FUSED_MAX_ROWS = 1


@triton.jit
def _weight_tile(signs_ptr, u_ptr, v_ptr, offs_k, offs_n, offs_r, k_mask, n_mask, r_mask,
                 BLOCKS, stride_sj, stride_sn, stride_sc, stride_uj, stride_un, stride_ur,
                 stride_vj, stride_vk, stride_vr, FACTORS_FP16: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """The float32 tile `Wᵀ[offs_k, offs_n] = Σ_j S_jᵀ ⊙ (v_j u_jᵀ)` over the loaded blocks."""
    v_offs = offs_k[:, None] * stride_vk + offs_r[None, :] * stride_vr
    v_mask = k_mask[:, None] & r_mask[None, :]
    u_offs = offs_r[:, None] * stride_ur + offs_n[None, :] * stride_un
    u_mask = r_mask[:, None] & n_mask[None, :]
    # Input k of out-feature n: bit k % 8 of byte k // 8 in row n (set = negative).
    s_offs = (offs_k // 8)[:, None] * stride_sc + offs_n[None, :] * stride_sn
    s_shift = (offs_k % 8)[:, None]
    kn_mask = k_mask[:, None] & n_mask[None, :]
    w = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
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
    return w


@triton.jit
def _bitstack_reconstruct_kernel(
    signs_ptr, u_ptr, v_ptr, wt_ptr, N, K, BLOCKS, RANK,
    stride_sj, stride_sn, stride_sc, stride_uj, stride_un, stride_ur,
    stride_vj, stride_vk, stride_vr, stride_wk, stride_wn,
    FACTORS_FP16: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):  # fmt: skip
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    k_mask = offs_k < K
    n_mask = offs_n < N
    w = _weight_tile(signs_ptr, u_ptr, v_ptr, offs_k, offs_n, offs_r, k_mask, n_mask,
                     offs_r < RANK, BLOCKS, stride_sj, stride_sn, stride_sc, stride_uj,
                     stride_un, stride_ur, stride_vj, stride_vk, stride_vr, FACTORS_FP16,
                     BLOCK_K, BLOCK_N)  # fmt: skip
    w_offs = offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    tl.store(wt_ptr + w_offs, w.to(wt_ptr.dtype.element_ty),
             mask=k_mask[:, None] & n_mask[None, :])  # fmt: skip


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
    K_SPLIT,
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
    ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask = offs_m < M
    n_mask = offs_n < N
    r_mask = offs_r < RANK
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_end = tl.minimum(pid_k * K_SPLIT + K_SPLIT, K)
    for k0 in range(pid_k * K_SPLIT, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        w = _weight_tile(signs_ptr, u_ptr, v_ptr, offs_k, offs_n, offs_r, k_mask, n_mask,
                         r_mask, BLOCKS, stride_sj, stride_sn, stride_sc, stride_uj, stride_un,
                         stride_ur, stride_vj, stride_vk, stride_vr, FACTORS_FP16,
                         BLOCK_K, BLOCK_N)  # fmt: skip
        acc = dot_accumulate(acc, x, w, IEEE_FP32)

    if ATOMIC:  # K split over programs: add this split's partial sums (bias: the first split's)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            acc += tl.where(pid_k == 0, bias, 0.0)[None, :]
        out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.atomic_add(out, acc, mask=m_mask[:, None] & n_mask[None, :])
    else:
        store_output(
            acc, bias_ptr, out_ptr, offs_m, offs_n, m_mask, n_mask, stride_om, stride_on, HAS_BIAS
        )


def _block_r(rank: int) -> int:
    """The rank padded for `tl.dot`, whose inner dimension is at least 16."""
    return max(16, next_power_of_2(max(rank, 1)))


def triton_bitstack_reconstruct_t(
    signs: Tensor, u: Tensor, v: Tensor, in_features: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """`Wᵀ` `[in_features, out_features]` in `dtype`: `bitstack_reconstruct`'s weight,
    transposed, in one Triton pass (each element rounded once, from float32)."""
    check_bitstack_tensors(signs, u, v, in_features)
    return _reconstruct_t(signs, u, v, in_features, dtype)


def _reconstruct_t(signs, u, v, in_features: int, dtype: torch.dtype) -> Tensor:
    """The reconstruct launch, the tensors already checked (once per call, by the caller)."""
    blocks, out_features, rank = u.shape
    wt = torch.empty(in_features, out_features, dtype=dtype, device=signs.device)
    block_k, block_n = 32, 64
    grid = (ceil_div(in_features, block_k), ceil_div(out_features, block_n))
    if in_features and out_features:
        _bitstack_reconstruct_kernel[grid](
            signs, u, v, wt, out_features, in_features, blocks, rank,
            signs.stride(0), signs.stride(1), signs.stride(2),
            u.stride(0), u.stride(1), u.stride(2), v.stride(0), v.stride(1), v.stride(2),
            wt.stride(0), wt.stride(1),
            FACTORS_FP16=u.dtype == torch.float16 and v.dtype == torch.float16,
            BLOCK_K=block_k, BLOCK_N=block_n, BLOCK_R=_block_r(rank),
        )  # fmt: skip
    return wt


def triton_bitstack_linear(
    x: Tensor,
    signs: Tensor,
    u: Tensor,
    v: Tensor,
    in_features: int,
    bias: Tensor | None = None,
    *,
    path: str = "auto",
    tiles: Tiles | None = None,
) -> Tensor:
    """`x @ Wᵀ + bias` for the BitStack weight `W = Σ_j S_j ⊙ (u_j v_jᵀ)`: the fused kernel,
    or (more than `FUSED_MAX_ROWS` rows) the reconstruct kernel feeding torch's matmul.

    Same contract as `memtool.ops.reference.bitstack_linear`.

    Args:
        x: activations `[..., in_features]`, float16, bfloat16 or float32, on CUDA (or on CPU
            with `TRITON_INTERPRET=1` set before this module was imported).
        signs: uint8 `[blocks, out_features, ceil(in_features / 8)]`.
        u: float `[blocks, out_features, rank]` (float16 in checkpoints).
        v: float `[blocks, in_features, rank]`.
        in_features: input features (the packed width rounds up to 8).
        bias: optional `[out_features]`.
        path: `auto`, `fused` or `reconstruct`: for benchmarks.
        tiles: the fused launch's tile shape; None picks `default_tiles` for the call's shape.

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
    if path not in ("auto", "fused", "reconstruct"):
        raise MemtoolError(f"unknown BitStack kernel path {path!r}; use auto, fused or reconstruct")
    x2 = x.reshape(-1, in_features)
    m = x2.shape[0]
    blocks, _, rank = u.shape
    if path == "reconstruct" or (path == "auto" and m > FUSED_MAX_ROWS):
        wt = _reconstruct_t(signs, u, v, in_features, x.dtype)
        out = torch.addmm(bias.to(x.dtype), x2, wt) if bias is not None else x2 @ wt
        return out.reshape(*x.shape[:-1], out_features)
    tiles = tiles or default_tiles(m, out_features, in_features)
    grid = (ceil_div(m, tiles.block_m), ceil_div(out_features, tiles.block_n))
    splits, steps_per_split = k_splits(grid[0] * grid[1], in_features, tiles.block_k, x.device)
    atomic = splits > 1
    if atomic:
        out = torch.zeros(m, out_features, dtype=torch.float32, device=x.device)
    else:
        out = torch.empty(m, out_features, dtype=x.dtype, device=x.device)
    if m > 0 and out_features > 0:
        block_r = _block_r(rank)
        _bitstack_matmul_kernel[(*grid, splits)](
            x2,
            signs,
            u,
            v,
            bias if bias is not None else out,  # never read without HAS_BIAS
            out,
            m,
            out_features,
            in_features,
            steps_per_split * tiles.block_k,
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
            ATOMIC=atomic,
            BLOCK_M=tiles.block_m,
            BLOCK_N=tiles.block_n,
            BLOCK_K=tiles.block_k,
            BLOCK_R=block_r,
            num_warps=tiles.num_warps,
        )
    if atomic:
        out = out.to(x.dtype)
    return out.reshape(*x.shape[:-1], out_features)
