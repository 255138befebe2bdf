"""Reference training kernels: activation packing for swapping, and the fused AdamW step.

The pure-PyTorch specification of two ops of issue 6 (memory-efficient training); the Triton
kernels in `memtool.ops.triton.activation_pack` and `memtool.ops.triton.adamw_step` are tested
against these, and CPU runs them directly.

Activation packing compresses a tensor stashed for backward before it is swapped to host memory:

- `bf16`: the values rounded to bfloat16, to nearest with ties to even (what `x.to(bfloat16)`
  does); half the bytes of float32, lossless for bfloat16 activations.
- `int8`: symmetric absmax quantisation per row (the last dimension is the row, as in the
  per-token quantisation of LLM.int8()): `scale = absmax / 127` kept in float32,
  `q = clamp(round_half_even(x / scale), -127, 127)`; unpacking is `q * scale` in the original
  dtype. -128 is never used so the grid is symmetric. A row of zeros gets scale 1, which
  unpacks to exact zeros.

`adamw_step_reference` is `torch.optim.AdamW` (the single-tensor path, `foreach=False`,
`fused=False`) op for op, preceded by unscaling a loss-scaled gradient and applying a global
clip coefficient, and followed by writing the low-precision copy of the weights the forward
pass reads. Because it calls the same torch ops in the same order, it equals `torch.optim.AdamW`
bitwise on any device; what that arithmetic is differs between torch's CPU and CUDA kernels
(see `memtool.ops.triton.adamw_step` for which the Triton kernel follows).
"""

import dataclasses
from typing import Literal

import torch
from torch import Tensor

from memtool.errors import MemtoolError

PackFormat = Literal["bf16", "int8"]
PACK_FORMATS: tuple[str, ...] = ("bf16", "int8")
PACKABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOWP_DTYPES = (torch.bfloat16, torch.float16)
INT8_MAX = 127


@dataclasses.dataclass(frozen=True, eq=False)  # tensors have no single truth value
class Packed:
    """A packed activation: what is swapped out, and what is needed to restore it.

    Attributes:
        fmt: `"bf16"` or `"int8"`.
        data: bfloat16 or int8 values, contiguous, in the original shape.
        scales: float32 per-row scales, shape `shape[:-1]`, for `int8`; None for `bf16`.
        shape: the original shape.
        dtype: the original dtype, restored by unpacking.
    """

    fmt: str
    data: Tensor
    scales: Tensor | None
    shape: torch.Size
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data held (values plus scales), what swapping moves."""
        scale_bytes = 0 if self.scales is None else self.scales.numel() * self.scales.element_size()
        return self.data.numel() * self.data.element_size() + scale_bytes


def check_pack_input(x: Tensor, fmt: str) -> None:
    """Raise `MemtoolError` unless `x` can be packed as `fmt`."""
    if fmt not in PACK_FORMATS:
        raise MemtoolError(
            f"unknown activation format {fmt!r}; use one of {', '.join(PACK_FORMATS)}"
        )
    if x.dtype not in PACKABLE_DTYPES:
        raise MemtoolError(f"only float32/float16/bfloat16 activations pack, not {x.dtype}")


def check_packed(packed: Packed) -> None:
    """Raise `MemtoolError` unless `packed` is consistent (a format, dtypes and shapes that fit)."""
    expected = {"bf16": torch.bfloat16, "int8": torch.int8}.get(packed.fmt)
    if expected is None:
        raise MemtoolError(f"unknown activation format {packed.fmt!r}")
    if packed.data.dtype != expected or packed.data.shape != packed.shape:
        raise MemtoolError(
            f"{packed.fmt} data must be {expected} {list(packed.shape)}, "
            f"got {packed.data.dtype} {list(packed.data.shape)}"
        )
    if packed.dtype not in PACKABLE_DTYPES:
        raise MemtoolError(f"packed activations unpack to float dtypes, not {packed.dtype}")
    if packed.fmt == "int8":
        rows = packed.shape[:-1]
        if packed.scales is None or packed.scales.dtype != torch.float32:
            raise MemtoolError("int8 activations need float32 scales")
        if packed.scales.shape != rows or packed.scales.device != packed.data.device:
            raise MemtoolError(
                f"scales must be {list(rows)} on {packed.data.device}, "
                f"got {list(packed.scales.shape)} on {packed.scales.device}"
            )


def row_count(shape: torch.Size) -> tuple[int, int]:
    """`(rows, row_length)` of a tensor whose last dimension is the row (a scalar is one row)."""
    cols = shape[-1] if len(shape) else 1
    return (shape.numel() // cols if cols else shape[:-1].numel()), cols


def pack_activation_reference(x: Tensor, fmt: str) -> Packed:
    """Pack `x` as `fmt` (`"bf16"` or `"int8"`, see the module docstring).

    Args:
        x: float32, float16 or bfloat16, any shape and strides; the last dimension is the row.
        fmt: `"bf16"` or `"int8"`.

    Returns:
        A `Packed` whose data is a new contiguous tensor on `x`'s device.
    """
    check_pack_input(x, fmt)
    if fmt == "bf16":
        data = x.to(torch.bfloat16, memory_format=torch.contiguous_format, copy=True)
        return Packed("bf16", data, None, x.shape, x.dtype)
    rows, cols = row_count(x.shape)
    flat = x.reshape(rows, cols).float()
    absmax = flat.abs().amax(dim=1) if cols else flat.new_zeros(rows)  # amax refuses 0 columns
    # A 0-dim divisor, not the number 127: torch's CUDA division multiplies by the reciprocal
    # of a Python scalar, so this keeps the scale an IEEE division on every device.
    scales = absmax / absmax.new_full((), float(INT8_MAX))
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)
    q = torch.round(flat / scales[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return Packed("int8", q.reshape(x.shape), scales.reshape(x.shape[:-1]), x.shape, x.dtype)


def unpack_activation_reference(packed: Packed) -> Tensor:
    """Restore a packed activation: a new contiguous tensor of `packed.shape` and `.dtype`."""
    check_packed(packed)
    if packed.fmt == "bf16":
        return packed.data.to(packed.dtype, copy=True)
    rows, cols = row_count(packed.shape)
    values = packed.data.reshape(rows, cols).float() * packed.scales.reshape(rows, 1)
    return values.to(packed.dtype).reshape(packed.shape)


def check_adamw_tensors(
    param_fp32: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    grad_scale: float,
    out_lowp: Tensor | None,
    clip_coef: float | Tensor = 1.0,
) -> None:
    """Raise `MemtoolError` unless the buffers fit `adamw_step`'s contract.

    Every buffer is contiguous, on one device, with the same number of elements (shapes may
    differ: they are flat buffers); the weights and both moments are float32. A tensor
    `clip_coef` is one float32 element on that device.
    """
    if isinstance(clip_coef, Tensor) and (
        clip_coef.numel() != 1
        or clip_coef.dtype != torch.float32
        or clip_coef.device != param_fp32.device
    ):
        raise MemtoolError(
            f"a tensor clip_coef must be one float32 element on {param_fp32.device}, not "
            f"{clip_coef.numel()} {clip_coef.dtype} on {clip_coef.device}"
        )
    named = {"param_fp32": param_fp32, "grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    if out_lowp is not None:
        named["out_lowp"] = out_lowp
        if out_lowp.dtype not in LOWP_DTYPES:
            raise MemtoolError(f"out_lowp must be bfloat16 or float16, not {out_lowp.dtype}")
    for name in ("param_fp32", "exp_avg", "exp_avg_sq"):
        if named[name].dtype != torch.float32:
            raise MemtoolError(f"{name} must be float32, not {named[name].dtype}")
    if grad.dtype not in PACKABLE_DTYPES:
        raise MemtoolError(f"grad must be float32/float16/bfloat16, not {grad.dtype}")
    for name, tensor in named.items():
        if tensor.numel() != param_fp32.numel():
            raise MemtoolError(
                f"{name} has {tensor.numel()} elements but param_fp32 has {param_fp32.numel()}"
            )
        if tensor.device != param_fp32.device:
            raise MemtoolError(
                f"{name} is on {tensor.device} but param_fp32 on {param_fp32.device}"
            )
        if not tensor.is_contiguous():
            raise MemtoolError(f"{name} must be contiguous (a flat buffer)")
    if step < 1:
        raise MemtoolError(f"step counts from 1 (the step being taken), got {step}")
    if grad_scale == 0:
        raise MemtoolError("grad_scale must be nonzero")


def grad_multiplier(clip_coef: Tensor, grad_scale: float) -> Tensor:
    """`clip_coef / grad_scale` for a tensor coefficient: one float32 element, on its device."""
    return (clip_coef.reshape(1) / grad_scale).to(torch.float32)


def adamw_step_reference(
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
    """One AdamW step on flat buffers, in place: unscale, clip, update, write compute weights.

    `g = grad.float() * (clip_coef / grad_scale)`, then `torch.optim.AdamW`'s single-tensor
    update with decoupled weight decay, then `out_lowp.copy_(param_fp32)` if given.

    Args:
        param_fp32: float32 master weights, updated in place.
        grad: the (possibly loss-scaled) gradient, float32/float16/bfloat16; not modified.
        exp_avg: float32 first moment, updated in place.
        exp_avg_sq: float32 second moment, updated in place.
        lr, beta1, beta2, eps, weight_decay: as in `torch.optim.AdamW`.
        step: the number of this step, counting from 1 (torch's `state["step"]` after its +1).
        grad_scale: the loss scale the gradient carries; the gradient is divided by it.
        clip_coef: a global gradient-clipping coefficient computed beforehand (`min(1,
            max_norm / total_norm)`), multiplied in: a float, or a one-element float32 tensor
            on the buffers' device (computed there: the host need not wait for the norm).
        out_lowp: optional bfloat16/float16 buffer that receives the updated weights.

    Raises:
        MemtoolError: buffers that do not fit (see `check_adamw_tensors`).
    """
    check_adamw_tensors(
        param_fp32, grad, exp_avg, exp_avg_sq, step, grad_scale, out_lowp, clip_coef
    )
    param, exp_avg, exp_avg_sq = param_fp32.view(-1), exp_avg.view(-1), exp_avg_sq.view(-1)
    g = grad.view(-1).float()
    if isinstance(clip_coef, Tensor):
        # float32 division on the device, as `grad_multiplier` gives the kernel.
        g = g * grad_multiplier(clip_coef, grad_scale)
    elif clip_coef / grad_scale != 1.0:  # multiplying by 1 is exact; skipping it saves a copy
        g = g * (clip_coef / grad_scale)

    # torch.optim.adam._single_tensor_adam with decoupled_weight_decay=True, op for op.
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** float(step)
    bias_correction2 = 1 - beta2 ** float(step)
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)

    if out_lowp is not None:
        out_lowp.view(-1).copy_(param)
