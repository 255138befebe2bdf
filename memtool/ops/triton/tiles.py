"""Tile steps the Triton matmul kernels share: the accumulating dot and the output epilogue."""

import triton
import triton.language as tl


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
