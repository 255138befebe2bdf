"""Tile steps the Triton matmul kernels share: the accumulating dot and the output epilogue,
and the tile shapes a launch may be given instead of the defaults."""

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from memtool.ops.triton.launch import ceil_div

# Programs per multiprocessor to aim for when splitting K: enough loads in flight to hide
# memory latency when the output alone gives too few programs (decode).
PROGRAMS_PER_SM = 8


class Tiles(NamedTuple):
    """A matmul launch's tile shape: output rows x columns per program, the K-step, warps.

    The kernels pick these from the call's shape; `benchmarks/gpu_linear_kernels.py` passes
    others to sweep them on a GPU. Each of `block_m`, `block_n`, `block_k` must be a power of
    two of at least 16 (`tl.dot`'s smallest tile).
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4


def default_tiles(m: int, n: int, k: int) -> Tiles:
    """Fixed tile shapes: decode (small M) gets the smallest M-tile `tl.dot` accepts (16)."""
    return Tiles(16 if m <= 16 else 64, 64 if n % 64 == 0 else 32, 64 if k % 64 == 0 else 32)


@triton.jit
def dot_accumulate(acc, x, w, IEEE_FP32: tl.constexpr):
    """`acc + x @ w` in float32: IEEE float32 for float32 activations (no TF32), else the
    weight tile rounded to the activations' dtype first (tensor cores)."""
    if IEEE_FP32:
        return tl.dot(x.to(tl.float32), w, acc, input_precision="ieee")
    return tl.dot(x, w.to(x.dtype), acc)


@triton.jit
def store_output(
    acc,
    bias_ptr,
    out_ptr,
    offs_m,
    offs_n,
    m_mask,
    n_mask,
    stride_om,
    stride_on,
    HAS_BIAS: tl.constexpr,
):
    """Add the bias (if any) to the float32 tile and store it in the output's dtype."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
        acc.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """The device's multiprocessor count; 2 for the interpreter (small, so tests split K too)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def k_splits(programs: int, k: int, block_k: int, device: torch.device) -> tuple[int, int]:
    """`(splits, BLOCK_K steps per split)` of K for a launch of `programs` output tiles: enough
    programs for about `PROGRAMS_PER_SM` per multiprocessor, each split whole steps. Splits > 1
    mean the partial sums are added atomically (in float32)."""
    k_steps = max(ceil_div(k, block_k), 1)
    wanted = ceil_div(PROGRAMS_PER_SM * multiprocessors(device), max(programs, 1))
    steps_per_split = ceil_div(k_steps, max(1, min(wanted, k_steps)))
    return ceil_div(k_steps, steps_per_split), steps_per_split
