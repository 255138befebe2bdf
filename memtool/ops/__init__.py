"""Kernel contracts and backend choice: each op has a pure-PyTorch reference and device kernels.

`reference.py` is the specification and runs everywhere; `triton/` holds the GPU kernels, which
are imported only once chosen (memtool imports without triton). The caller picks a
`KernelBackend`: `auto` runs Triton when it can (triton installed and CUDA tensors, or CPU
tensors with `TRITON_INTERPRET=1`) and the reference otherwise; `triton` where Triton cannot
run is an error, never a silent fallback. The first call of an op on each backend and device
logs which backend ran to the `memtool.ops` logger (INFO).
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
from memtool.ops import reference

log = logging.getLogger("memtool.ops")
_logged: set[tuple[str, str, str]] = set()


class KernelBackend(enum.StrEnum):
    """Which implementation runs an op."""

    AUTO = "auto"
    REFERENCE = "reference"
    TRITON = "triton"


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


def triton_status(device: torch.device | str, dtype: torch.dtype | None = None) -> tuple[bool, str]:
    """Whether Triton kernels can run on tensors on `device` (of `dtype`), and why (not).

    Args:
        device: where the tensors live.
        dtype: the activations' dtype, if known: the interpreter cannot run bfloat16 dots.

    Returns:
        `(usable, reason)`; the reason is one line fit for an error or `memtool info`.
    """
    device = torch.device(device)
    if importlib.util.find_spec("triton") is None:
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


def backend_used(
    device: torch.device | str,
    backend: KernelBackend | str = KernelBackend.AUTO,
    dtype: torch.dtype | None = None,
) -> KernelBackend:
    """The backend that an op asked for `backend` runs on tensors on `device`.

    Args:
        device: where the op's tensors live.
        backend: `auto`, `reference` or `triton` (enum or its string).
        dtype: the activations' dtype, if known (see `triton_status`).

    Returns:
        `KernelBackend.REFERENCE` or `KernelBackend.TRITON`, never `AUTO`.

    Raises:
        MemtoolError: an unknown backend name, or `triton` where Triton cannot run.
    """
    try:
        backend = KernelBackend(backend)
    except ValueError:
        names = ", ".join(b.value for b in KernelBackend)
        raise MemtoolError(f"unknown kernel backend {backend!r}; use one of {names}") from None
    if backend is KernelBackend.REFERENCE:
        return backend
    usable, reason = triton_status(device, dtype)
    if backend is KernelBackend.TRITON and not usable:
        raise MemtoolError(f"the triton backend cannot run here: {reason}")
    return KernelBackend.TRITON if usable else KernelBackend.REFERENCE


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
        backend: see `backend_used`.

    Returns:
        `[..., out_features]` in `x.dtype`, accumulated in float32.
    """
    chosen = backend_used(x.device, backend, x.dtype)
    _log_first_use("gptq_linear", chosen, x.device)
    if chosen is KernelBackend.TRITON:
        from memtool.ops.triton.gptq_matmul import triton_gptq_linear

        return triton_gptq_linear(x, qweight, qzeros, scales, g_idx, bits, in_features, bias)
    return reference.gptq_linear(x, qweight, qzeros, scales, g_idx, bits, in_features, bias)


__all__ = [
    "KernelBackend",
    "backend_used",
    "gptq_linear",
    "triton_interpreting",
    "triton_status",
]
