"""Kernel contracts and backend choice: each op has a pure-PyTorch reference and device kernels.

`reference.py` is the specification and runs everywhere; `triton/` holds the GPU kernels, which
are imported only once chosen (memtool imports without triton); `cpu/` holds a native C++ kernel
for decode-sized calls, compiled on first use. The caller picks a `KernelBackend`: `auto` runs
Triton when it can (triton installed and CUDA tensors, or CPU tensors with `TRITON_INTERPRET=1`),
else, on CPU tensors, the native CPU kernel for calls it handles that have few rows (at most
`CPU_MAX_ROWS` for GPTQ, see `gptq_backend_used`; `CPU_MAX_ROWS_BITSTACK` for BitStack, see
`bitstack_backend_used`), and the reference otherwise. `triton` or `cpu` where that backend
cannot run is an error, never a silent fallback; under `auto`, a CPU kernel that fails to build
is reported once (WARNING) and the reference runs. The first call of an op on each backend and
device logs which backend ran to the `memtool.ops` logger (INFO).

The training ops (`pack_activation`, `unpack_activation`, `adamw_step`; references in
`reference_train.py`) have Triton kernels and no native CPU kernel: see `train_backend_used`.
`OPS_BY_BACKEND` lists which ops each backend implements (`memtool info` shows it).
"""

import enum
import functools
import importlib.util
import logging
import os
import sys

import torch
from torch import Tensor

from memtool.errors import MemtoolError
from memtool.ops import reference, reference_train
from memtool.ops.cpu import (
    CPU_MAX_ROWS,
    CPU_MAX_ROWS_BITSTACK,
    cpu_bitstack_linear,
    cpu_gptq_linear,
    cpu_kernel_status,
    cpu_unsupported_reason,
)
from memtool.ops.reference_train import PACK_FORMATS, Packed, PackFormat

log = logging.getLogger("memtool.ops")
_logged: set[tuple[str, str, str]] = set()
_warned_cpu_kernel = False


class KernelBackend(enum.StrEnum):
    """Which implementation runs an op."""

    AUTO = "auto"
    REFERENCE = "reference"
    TRITON = "triton"
    CPU = "cpu"


_LINEAR_OPS = ("gptq_linear", "bitstack_linear")
_TRAIN_OPS = ("pack_activation", "unpack_activation", "adamw_step")
OPS_BY_BACKEND: dict[str, tuple[str, ...]] = {
    KernelBackend.REFERENCE.value: _LINEAR_OPS + _TRAIN_OPS,
    KernelBackend.TRITON.value: _LINEAR_OPS + _TRAIN_OPS,
    KernelBackend.CPU.value: _LINEAR_OPS,
}


@functools.cache
def triton_interpreting() -> bool:
    """Whether the imported triton runs kernels in its interpreter.

    triton fixes this when it is imported (its own `tl.*` helpers are jitted then), so setting
    TRITON_INTERPRET=1 afterwards has no effect; hence the cache. Imports triton: call it only
    when triton is installed.
    """
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    return any(isinstance(value, InterpretedFunction) for value in vars(standard).values())


@functools.cache
def _triton_installed() -> bool:
    # Cached: find_spec walks sys.path while triton is not imported (~50 us), and every
    # decode-step linear asks.
    return importlib.util.find_spec("triton") is not None


def triton_status(device: torch.device | str, dtype: torch.dtype | None = None) -> tuple[bool, str]:
    """Whether Triton kernels can run on tensors on `device` (of `dtype`), and why (not).

    Args:
        device: where the tensors live.
        dtype: the activations' dtype, if known: the interpreter cannot run bfloat16 dots.

    Returns:
        `(usable, reason)`; the reason is one line fit for an error or `memtool info`.
    """
    device = torch.device(device)
    if not _triton_installed():
        return False, "triton is not installed (pip install triton)"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if interpret and dtype == torch.bfloat16:
        # triton-lang/triton#11584: the interpreter multiplies bfloat16 bit patterns in tl.dot;
        # upstream does not support it, so refuse rather than return garbage.
        return False, "the Triton interpreter does not support bfloat16 dots"
    if device.type == "cuda":
        return True, "CUDA tensors"
    if device.type == "cpu" and interpret:
        if "triton" in sys.modules and not triton_interpreting():
            return False, (
                "TRITON_INTERPRET=1 was set after triton was imported; set it before Python starts"
            )
        return True, "TRITON_INTERPRET=1: the interpreter runs kernels on CPU (slow; for tests)"
    return False, (
        f"tensors are on {device.type}; Triton kernels need CUDA tensors "
        f"(or CPU tensors with TRITON_INTERPRET=1, for testing)"
    )


def cpu_status(device: torch.device | str) -> tuple[bool, str]:
    """Whether the native CPU kernel can run on tensors on `device`, and why (not).

    Builds the kernel on the first call in a process when the device is the CPU.

    Returns:
        `(usable, reason)`; the reason is one line fit for an error or `memtool info`.
    """
    device = torch.device(device)
    if device.type != "cpu":
        return False, f"tensors are on {device.type}; the cpu backend needs CPU tensors"
    return cpu_kernel_status()


def _as_backend(backend: KernelBackend | str) -> KernelBackend:
    try:
        return KernelBackend(backend)
    except ValueError:
        names = ", ".join(b.value for b in KernelBackend)
        raise MemtoolError(f"unknown kernel backend {backend!r}; use one of {names}") from None


def backend_used(
    device: torch.device | str,
    backend: KernelBackend | str = KernelBackend.AUTO,
    dtype: torch.dtype | None = None,
) -> KernelBackend:
    """The backend that an op asked for `backend` runs on tensors on `device`, shapes aside.

    `auto` picks the native CPU kernel only per call, since that depends on the call's rows
    (and GPTQ's bits and g_idx): `gptq_backend_used` and `bitstack_backend_used` answer for a
    `gptq_linear` or `bitstack_linear` call.

    Args:
        device: where the op's tensors live.
        backend: `auto`, `reference`, `triton` or `cpu` (enum or its string).
        dtype: the activations' dtype, if known (see `triton_status`).

    Returns:
        `REFERENCE`, `TRITON` or (asked for explicitly) `CPU`; never `AUTO`.

    Raises:
        MemtoolError: an unknown backend name, or `triton` or `cpu` where it cannot run.
    """
    backend = _as_backend(backend)
    if backend is KernelBackend.REFERENCE:
        return backend
    if backend is KernelBackend.CPU:
        usable, reason = cpu_status(device)
        if not usable:
            raise MemtoolError(f"the cpu backend cannot run here: {reason}")
        return backend
    usable, reason = triton_status(device, dtype)
    if backend is KernelBackend.TRITON and not usable:
        raise MemtoolError(f"the triton backend cannot run here: {reason}")
    return KernelBackend.TRITON if usable else KernelBackend.REFERENCE


def gptq_backend_used(
    x: Tensor,
    g_idx: Tensor,
    bits: int,
    in_features: int,
    backend: KernelBackend | str = KernelBackend.AUTO,
) -> KernelBackend:
    """The backend `gptq_linear` runs for activations `x` and a layer's `g_idx` and `bits`.

    Under `auto` on CPU tensors, the native kernel runs when it is built, handles the layer
    (static groups, see `memtool.ops.cpu.cpu_unsupported_reason`) and `x` has at most
    `CPU_MAX_ROWS` rows; above that, dequantizing once and calling BLAS is faster.

    Raises:
        MemtoolError: as `backend_used`, or `cpu` asked for a call the kernel does not handle.
    """
    chosen = backend_used(x.device, backend, x.dtype)
    if chosen is KernelBackend.CPU:
        reason = cpu_unsupported_reason(x, g_idx, bits)
        if reason is not None:
            raise MemtoolError(f"the cpu backend cannot run this call: {reason}")
        return chosen
    if KernelBackend(backend) is not KernelBackend.AUTO or chosen is not KernelBackend.REFERENCE:
        return chosen
    rows = x.numel() // in_features if in_features else 0
    if rows > CPU_MAX_ROWS or cpu_unsupported_reason(x, g_idx, bits) is not None:
        return chosen
    return _cpu_kernel_or(chosen)


def bitstack_backend_used(
    x: Tensor, in_features: int, backend: KernelBackend | str = KernelBackend.AUTO
) -> KernelBackend:
    """The backend `bitstack_linear` runs for activations `x`.

    Under `auto` on CPU tensors (Triton not usable), the native kernel runs when it is built and
    `x` has at most `CPU_MAX_ROWS_BITSTACK` rows; above that, reconstructing the weight once and
    calling BLAS is faster. The kernel handles every BitStack layer (any rank, width and block
    count), so `cpu` is refused only where the kernel cannot run at all.

    Raises:
        MemtoolError: as `backend_used`.
    """
    chosen = backend_used(x.device, backend, x.dtype)
    if KernelBackend(backend) is not KernelBackend.AUTO or chosen is not KernelBackend.REFERENCE:
        return chosen
    rows = x.numel() // in_features if in_features else 0
    if x.device.type != "cpu" or rows > CPU_MAX_ROWS_BITSTACK:
        return chosen
    return _cpu_kernel_or(chosen)


def _cpu_kernel_or(fallback: KernelBackend) -> KernelBackend:
    """`CPU` when the native kernel builds here, else `fallback`, warning once per process."""
    global _warned_cpu_kernel
    usable, reason = cpu_kernel_status()
    if usable:
        return KernelBackend.CPU
    if not _warned_cpu_kernel:
        _warned_cpu_kernel = True
        log.warning("the native CPU kernel is unavailable (%s); using the reference", reason)
    return fallback


def _log_first_use(op: str, backend: KernelBackend, device: torch.device) -> None:
    key = (op, backend.value, device.type)
    if key not in _logged:
        _logged.add(key)
        log.info("%s runs on the %s backend (%s tensors)", op, backend.value, device.type)


def gptq_linear(
    x: Tensor,
    qweight: Tensor,
    qzeros: Tensor,
    scales: Tensor,
    g_idx: Tensor,
    bits: int,
    in_features: int,
    bias: Tensor | None = None,
    backend: KernelBackend | str = KernelBackend.AUTO,
) -> Tensor:
    """`x @ W + bias` for a GPTQ-packed weight, on the chosen backend.

    Args:
        x: activations `[..., in_features]`.
        qweight: int32 `[in_features * bits // 32, out_features]`.
        qzeros: int32 `[n_groups, out_features * bits // 32]`, storing zero - 1.
        scales: `[n_groups, out_features]`.
        g_idx: int32 `[in_features]`, each input feature's group, in any order.
        bits: 2, 3, 4 or 8.
        in_features: input features of the layer.
        bias: optional `[out_features]`.
        backend: see `gptq_backend_used`.

    Returns:
        `[..., out_features]` in `x.dtype`, accumulated in float32.
    """
    chosen = gptq_backend_used(x, g_idx, bits, in_features, backend)
    _log_first_use("gptq_linear", chosen, x.device)
    if chosen is KernelBackend.TRITON:
        from memtool.ops.triton.gptq_matmul import triton_gptq_linear

        return triton_gptq_linear(x, qweight, qzeros, scales, g_idx, bits, in_features, bias)
    if chosen is KernelBackend.CPU:
        return cpu_gptq_linear(x, qweight, qzeros, scales, g_idx, bits, in_features, bias)
    return reference.gptq_linear(x, qweight, qzeros, scales, g_idx, bits, in_features, bias)


def bitstack_linear(
    x: Tensor,
    signs: Tensor,
    u: Tensor,
    v: Tensor,
    in_features: int,
    bias: Tensor | None = None,
    backend: KernelBackend | str = KernelBackend.AUTO,
) -> Tensor:
    """`x @ Wᵀ + bias` for a BitStack weight `W = Σ_j S_j ⊙ (u_j v_jᵀ)`, on the chosen backend.

    `auto` runs Triton where `backend_used` allows it, else on CPU tensors the native kernel
    for decode-sized calls (see `bitstack_backend_used`), else the reference.

    Args:
        x: activations `[..., in_features]`.
        signs: uint8 `[blocks, out_features, ceil(in_features / 8)]`, packed as in
            `memtool.formats.bitstack_pack`.
        u: `[blocks, out_features, rank]` (float16 in checkpoints).
        v: `[blocks, in_features, rank]`.
        in_features: input features of the layer.
        bias: optional `[out_features]`.
        backend: `auto`, `reference`, `triton` or `cpu`.

    Returns:
        `[..., out_features]` in `x.dtype`, accumulated in float32.

    Raises:
        MemtoolError: tensors that do not fit, or a backend that cannot run.
    """
    chosen = bitstack_backend_used(x, in_features, backend)
    _log_first_use("bitstack_linear", chosen, x.device)
    if chosen is KernelBackend.TRITON:
        from memtool.ops.triton.bitstack_matmul import triton_bitstack_linear

        return triton_bitstack_linear(x, signs, u, v, in_features, bias)
    if chosen is KernelBackend.CPU:
        return cpu_bitstack_linear(x, signs, u, v, in_features, bias)
    return reference.bitstack_linear(x, signs, u, v, in_features, bias)


def train_backend_used(
    device: torch.device | str, backend: KernelBackend | str = KernelBackend.AUTO
) -> KernelBackend:
    """The backend the training ops (activation packing, `adamw_step`) run on `device`.

    `auto` runs Triton where `triton_status` allows it (CUDA tensors, or CPU tensors under the
    interpreter), else the reference. These kernels take no dots, so bfloat16 runs in the
    interpreter too. There is no native CPU kernel for them: `cpu` is an error.

    Raises:
        MemtoolError: an unknown backend name, `cpu`, or `triton` where it cannot run.
    """
    if _as_backend(backend) is KernelBackend.CPU:
        raise MemtoolError(
            "the cpu backend has no training kernels (activation packing, AdamW); "
            "use auto, reference or triton"
        )
    return backend_used(device, backend)


def pack_backend_used(
    device: torch.device | str, fmt: PackFormat | str, backend: KernelBackend | str = "auto"
) -> KernelBackend:
    """The backend `pack_activation` runs: as `train_backend_used`, except that `auto` leaves
    `bf16` packing to torch's cast, the same rounding, which on an H200 ran faster than the
    Triton kernel (0.040 vs 0.062 ms for 4096 x 4096 float32: BENCHMARKS.md)."""
    chosen = train_backend_used(device, backend)
    if (
        chosen is KernelBackend.TRITON
        and fmt == "bf16"
        and _as_backend(backend) is KernelBackend.AUTO
    ):
        return KernelBackend.REFERENCE
    return chosen


def pack_activation(
    x: Tensor, fmt: PackFormat | str, backend: KernelBackend | str = KernelBackend.AUTO
) -> Packed:
    """Compress an activation stashed for backward, before it is swapped to host memory.

    Args:
        x: float32/float16/bfloat16, any shape and strides; the last dimension is the row.
        fmt: `"bf16"` (round to nearest even) or `"int8"` (per-row symmetric absmax, float32
            scales); see `memtool.ops.reference_train`.
        backend: `auto`, `reference` or `triton` (see `pack_backend_used`).

    Returns:
        A `Packed` on `x`'s device; `Packed.nbytes` is what swapping it moves.

    Raises:
        MemtoolError: an unknown format, a non-float `x`, or a backend that cannot run.
    """
    chosen = pack_backend_used(x.device, fmt, backend)
    _log_first_use("pack_activation", chosen, x.device)
    if chosen is KernelBackend.TRITON:
        from memtool.ops.triton.activation_pack import triton_pack_activation

        return triton_pack_activation(x, fmt)
    return reference_train.pack_activation_reference(x, fmt)


def unpack_activation(packed: Packed, backend: KernelBackend | str = KernelBackend.AUTO) -> Tensor:
    """Restore an activation packed by `pack_activation`, in its original shape and dtype.

    Args:
        packed: the packed activation, on the device to unpack on.
        backend: `auto`, `reference` or `triton` (see `train_backend_used`).

    Returns:
        A new contiguous tensor of `packed.shape` and `packed.dtype`.

    Raises:
        MemtoolError: an inconsistent `packed`, or a backend that cannot run.
    """
    chosen = train_backend_used(packed.data.device, backend)
    _log_first_use("unpack_activation", chosen, packed.data.device)
    if chosen is KernelBackend.TRITON:
        from memtool.ops.triton.activation_pack import triton_unpack_activation

        return triton_unpack_activation(packed)
    return reference_train.unpack_activation_reference(packed)


def adamw_step(
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
    backend: KernelBackend | str = KernelBackend.AUTO,
) -> None:
    """One AdamW step over flat buffers, in place: unscale, clip, update, write compute weights.

    The update is `torch.optim.AdamW`'s (decoupled weight decay) applied to
    `grad * (clip_coef / grad_scale)`; `out_lowp`, if given, receives the new weights.
    `clip_coef` may be a one-element float32 tensor on the buffers' device, so that clipping by
    a norm computed there does not make the host wait for it.
    Arguments as in `memtool.ops.reference_train.adamw_step_reference`; the Triton kernel's
    agreement with it is described in `memtool.ops.triton.adamw_step`.

    Args:
        backend: `auto`, `reference` or `triton` (see `train_backend_used`).

    Raises:
        MemtoolError: buffers that do not fit, or a backend that cannot run.
    """
    chosen = train_backend_used(param_fp32.device, backend)
    _log_first_use("adamw_step", chosen, param_fp32.device)
    hyper = {
        "lr": lr,
        "beta1": beta1,
        "beta2": beta2,
        "eps": eps,
        "weight_decay": weight_decay,
        "step": step,
        "grad_scale": grad_scale,
        "clip_coef": clip_coef,
        "out_lowp": out_lowp,
    }
    if chosen is KernelBackend.TRITON:
        from memtool.ops.triton.adamw_step import triton_adamw_step

        triton_adamw_step(param_fp32, grad, exp_avg, exp_avg_sq, **hyper)
        return
    reference_train.adamw_step_reference(param_fp32, grad, exp_avg, exp_avg_sq, **hyper)


__all__ = [
    "CPU_MAX_ROWS",
    "CPU_MAX_ROWS_BITSTACK",
    "OPS_BY_BACKEND",
    "PACK_FORMATS",
    "KernelBackend",
    "PackFormat",
    "Packed",
    "adamw_step",
    "backend_used",
    "bitstack_backend_used",
    "bitstack_linear",
    "cpu_status",
    "gptq_backend_used",
    "gptq_linear",
    "pack_activation",
    "pack_backend_used",
    "train_backend_used",
    "triton_interpreting",
    "triton_status",
    "unpack_activation",
]
