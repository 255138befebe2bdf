"""Fused AdamW step in Triton: unscale, clip, update and write compute weights in one pass.

Specification: `memtool.ops.reference_train.adamw_step_reference`, which is
`torch.optim.AdamW(foreach=False)` op for op. The reference runs some ten elementwise kernels,
each reading and writing whole buffers; this kernel reads the weights, gradient and both
moments once and writes the weights, moments and low-precision copy once (30 bytes per
float32 parameter with a bfloat16 copy, against about 100 for the op-by-op path).

Each program updates `BLOCK` consecutive elements of the flat buffers. Per element:

    g     = grad * f32(clip_coef / grad_scale)   (a tensor clip_coef: divided on the device)
    p     = p * f32(1 - lr * weight_decay)
    m     = fma(w, g - m, m)                 if |w| < 0.5, w = f32(1 - beta1)
            fma(w - 1, g - m, g)             otherwise
    v     = fma(f32(1 - beta2) * g, g, v * f32(beta2))
    denom = sqrt_rn(v) /rn f32(sqrt(bias_correction2)) + f32(eps)
    p     = p + (f32(-lr / bias_correction1) * m) /rn denom

where `f32(...)` is a Python float (double) computed on the host and rounded to float32, as
torch does with scalar arguments. That is the arithmetic of torch's CPU kernels for the same
ops (lerp and addcmul fuse their last multiply-add; addcdiv multiplies before it divides; a
tensor divided by a scalar is a true division). It is spelled out with `tl.fma`, `tl.div_rn` and
`tl.sqrt_rn` and compiled with `enable_fp_fusion=False`, so that the GPU and the interpreter
compute it identically: Triton's default `/` and `sqrt` are approximate on NVIDIA GPUs
(triton-lang/triton#10661), and its default contraction would fuse other multiply-adds.

Agreement with the reference (measured in `tests/ops/test_train_ops.py`): the moments are
bitwise equal on CPU; the weights differ by at most one float32 ulp where torch's vectorised
CPU `sqrt` is itself not correctly rounded (it is off by one ulp for about a fifth of inputs on
the AVX2 build); with a correctly rounded `sqrt` substituted, the reference and the kernel
agree bitwise. On CUDA, torch's kernels (as its sources read) divide by a scalar through its
reciprocal and evaluate addcdiv as `p + s * (m / denom)`, so the reference's weights differ
from the kernel's (and from torch's own CPU result). Measured on an H200 (2026-11-27,
`benchmarks/gpu_train_kernels.py`): the kernel bitwise equal to the CPU reference with a
correctly rounded sqrt on every buffer; against torch's CUDA reference, moments within 1 ulp and
weights within 3 ulps of the larger of each weight before and after the step (162 ulps of the
result itself where the update cancels the weight to nearly 0).
"""

import struct

import torch
import triton
import triton.language as tl
from torch import Tensor

from memtool.ops.reference_train import check_adamw_tensors, grad_multiplier
from memtool.ops.triton.activation_pack import (
    as_kernel_tensor,
    bf16_bits_to_fp32,
    check_triton_device,
    fp32_to_bf16_bits,
)
from memtool.ops.triton.launch import ceil_div

_BLOCK = 1024


@triton.jit
def _adamw_kernel(
    param_ptr,
    grad_ptr,
    exp_avg_ptr,
    exp_avg_sq_ptr,
    lowp_ptr,
    n,
    grad_mul,
    grad_mul_ptr,
    decay,
    lerp_weight,
    beta2,
    one_minus_beta2,
    bias_correction2_sqrt,
    eps,
    neg_step_size,
    LERP_SMALL: tl.constexpr,
    GRAD_BF16: tl.constexpr,
    GRAD_MUL_FROM_PTR: tl.constexpr,
    HAS_LOWP: tl.constexpr,
    LOWP_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if GRAD_BF16:
        g = bf16_bits_to_fp32(tl.load(grad_ptr + offs, mask=mask, other=0))
    else:
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # A multiplier computed on the device is read there: the host never waited for the norm.
    g = g * tl.load(grad_mul_ptr) if GRAD_MUL_FROM_PTR else g * grad_mul
    p = tl.load(param_ptr + offs, mask=mask, other=0.0) * decay
    m = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0)
    v = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0)

    # torch's lerp: anchored at the nearer end for accuracy (pytorch/pytorch#18871).
    m = tl.fma(lerp_weight, g - m, m) if LERP_SMALL else tl.fma(lerp_weight - 1.0, g - m, g)
    v = tl.fma(one_minus_beta2 * g, g, v * beta2)
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    p = p + tl.div_rn(neg_step_size * m, denom)

    tl.store(param_ptr + offs, p, mask=mask)
    tl.store(exp_avg_ptr + offs, m, mask=mask)
    tl.store(exp_avg_sq_ptr + offs, v, mask=mask)
    if HAS_LOWP:
        if LOWP_BF16:
            tl.store(lowp_ptr + offs, fp32_to_bf16_bits(p), mask=mask)
        else:
            tl.store(lowp_ptr + offs, p.to(tl.float16), mask=mask)


def _f32(value: float) -> float:
    """`value` rounded to float32 (to nearest even), as torch converts a scalar argument."""
    return struct.unpack("f", struct.pack("f", value))[0]


def triton_adamw_step(
    param_fp32: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    grad_scale: float = 1.0,
    clip_coef: float | Tensor = 1.0,
    out_lowp: Tensor | None = None,
) -> None:
    """One fused AdamW step, in place; same contract as `adamw_step_reference`.

    Buffers live on CUDA (or on CPU with `TRITON_INTERPRET=1` set before triton was imported).
    """
    check_adamw_tensors(
        param_fp32, grad, exp_avg, exp_avg_sq, step, grad_scale, out_lowp, clip_coef
    )
    check_triton_device("AdamW", param_fp32)
    n = param_fp32.numel()
    if n == 0:
        return
    # Host scalars exactly as torch's single-tensor AdamW forms them (Python floats), each
    # rounded to float32 here, where torch rounds it when the op takes the scalar.
    lerp_weight = _f32(1 - beta1)
    bias_correction1 = 1 - beta1 ** float(step)
    bias_correction2 = 1 - beta2 ** float(step)
    on_device = isinstance(clip_coef, Tensor)
    multiplier = grad_multiplier(clip_coef, grad_scale) if on_device else None
    _adamw_kernel[(ceil_div(n, _BLOCK),)](
        param_fp32,
        as_kernel_tensor(grad),
        exp_avg,
        exp_avg_sq,
        as_kernel_tensor(out_lowp) if out_lowp is not None else param_fp32,  # unread w/o HAS_LOWP
        n,
        1.0 if on_device else _f32(clip_coef / grad_scale),
        multiplier if on_device else param_fp32,  # unread without GRAD_MUL_FROM_PTR
        _f32(1 - lr * weight_decay),
        lerp_weight,
        _f32(beta2),
        _f32(1 - beta2),
        _f32(bias_correction2**0.5),
        _f32(eps),
        _f32(-(lr / bias_correction1)),
        LERP_SMALL=abs(lerp_weight) < 0.5,
        GRAD_BF16=grad.dtype == torch.bfloat16,
        GRAD_MUL_FROM_PTR=on_device,
        HAS_LOWP=out_lowp is not None,
        LOWP_BF16=out_lowp is not None and out_lowp.dtype == torch.bfloat16,
        BLOCK=_BLOCK,
        enable_fp_fusion=False,
    )
