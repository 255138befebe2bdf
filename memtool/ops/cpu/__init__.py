"""Native CPU kernels for GPTQ and BitStack linears at decode sizes, straight from packed data.

The reference (`memtool.ops.reference.gptq_linear`) dequantizes the whole weight to float32 on
every call, which is fine when hundreds of tokens share it (prefill, perplexity) and ruinous when
one token does (decoding). `gptq_gemm.cpp` reads the packed codes directly, vectorised across
output columns, compiled on first use for this machine (`build.py`). It handles static groups
only (`g_idx[i] == i // group_size`, group size a multiple of 32, a ragged last group allowed);
act-order checkpoints, whose g_idx is shuffled, stay on the reference.

Crossover (`CPU_MAX_ROWS`): the kernel's time grows linearly with the rows of x (~0.05 ms per
row on a 576x1536 4-bit layer, one AMD EPYC core, AVX2), the reference's starts at ~5 ms (the
dequantization) and then grows with BLAS's much cheaper slope. Best-of-N ms per call, 4-bit g128,
one thread (`python benchmarks/cpu_decode.py --crossover --threads 1`):

    rows               1     8    64    128    192    256    384    512
    576x1536 kernel  0.08  0.41  3.3    6.4    9.8   14.6   29.3   62.3
             ref     4.7   5.6   6.7   14.3   13.4   11.5   16.6   21.5
    1536x576 kernel  0.08  0.41  3.2    6.5   10.9   15.2   26.9   32.8
             ref     4.7   7.4   6.4    7.3   16.6   10.1   13.8   24.3

The curves cross between 192 and 256 rows; `auto` sends up to 128 rows (decoding, short
prompts: the kernel wins every measurement there, 1.1-60x) to the kernel and more (perplexity's
512-token windows, long prompts) to the reference. Two-thread runs could not be timed cleanly
on the shared 2-core machine; both paths use both threads, so the crossover should not move far.

BitStack (`bitstack_gemv.cpp`, `cpu_bitstack_linear`): a lookup-table GEMV (as in T-MAC and
LUT-GEMM) that never forms the weight. Per token row and block it tabulates, for each byte of
8 input columns, the 256 possible sums of `v_k * x` over the byte's negative-sign columns, then
each output row adds one table entry per byte: `S_j (v_k * x) = total_k - 2 * lookups`. The
reference instead reconstructs the dense weight on every call (~4-35 ms for 16 blocks of
smollm2-135m's shapes) and calls BLAS.

Crossover (`CPU_MAX_ROWS_BITSTACK`, provisional): the kernel's time grows linearly with the
rows of x, the reference's is almost flat at these sizes. Best-of-5 ms per call, 16 blocks,
fp16 factors, one thread, AMD EPYC (AVX2), measured while another benchmark kept both cores of
the machine busy, so individual numbers are noisy by tens of percent
(`OMP_NUM_THREADS=1 python benchmarks/cpu_bitstack_decode.py`):

    rows                  1      2      4      8     16     32     64
    576x576  r4  kernel  0.58   1.16   2.11   3.96   8.12   16.0   31.3
                 ref    15.1   15.0   11.2   10.8   11.1   10.1   11.4
    192x576  r2  kernel  0.25   0.49   1.00   1.90   3.82   7.65   16.2
                 ref     4.24   4.50   4.22   4.00   4.21   4.17   4.24
    1536x576 r7  kernel  1.73   3.84   7.72   15.8   33.1   56.2   117
                 ref    32.4   39.0   33.4   33.5   33.6   32.7   41.4
    576x1536 r7  kernel  1.95   4.66   9.40   15.4   46.0   75.5   157
                 ref    34.5   35.2   36.5   34.0   36.5   34.8   30.4

(`out x in`, rank.) The kernel is 17-26x faster at one row (decoding) and 2.1-2.7x at 8; the
curves cross at about 15-22 rows (0.8-1.4x at 16), so `auto` sends up to 16 rows to the kernel
and more (prefill, perplexity windows) to the reference. To be re-measured on a quiet machine,
and with two threads (the kernel splits (row, block) pairs over threads; not timed here).
"""

import functools
import weakref

import torch
from torch import Tensor

from memtool.errors import MemtoolError
from memtool.formats.gptq_pack import check_gptq_tensors
from memtool.ops.cpu.build import build_dir, load_kernel
from memtool.ops.reference import check_bitstack_tensors, check_linear_inputs

# Rows of x up to which `auto` runs the kernel; measured in the module docstring. The dispatch
# reads `memtool.ops.CPU_MAX_ROWS`.
CPU_MAX_ROWS = 128

# Rows of x up to which `auto` runs the BitStack kernel (`cpu_bitstack_linear`); provisional,
# measured on a busy machine (module docstring). The dispatch reads
# `memtool.ops.CPU_MAX_ROWS_BITSTACK`.
CPU_MAX_ROWS_BITSTACK = 16

_BLOCK = 32  # input features per packed block; group sizes must be multiples of it
_group_sizes: dict[int, tuple[weakref.ref, int | None, int | None]] = {}


@functools.cache
def cpu_kernel_status() -> tuple[bool, str]:
    """Whether the native CPU kernel can run in this process, and why (not).

    Builds the kernel on the first call (seconds; later processes load the cached build).

    Returns:
        `(usable, reason)`; the reason is one line, e.g. "no C++ compiler (...)" or the
        compiler's first error.
    """
    usable, reason = load_kernel()
    if usable:
        # Shapes without data, so the op traces under torch.compile and passes opcheck.
        @torch.library.register_fake("memtool_cpu::gptq_gemm")
        def _(x, qweight, qzeros, scales, bias, bits, group_size):
            return x.new_empty(x.shape[0], qweight.shape[1])

        @torch.library.register_fake("memtool_cpu::bitstack_gemv")
        def _(x, signs, u, v, bias, in_features):
            return x.new_empty(x.shape[0], signs.shape[1])

    return usable, reason


def find_static_group_size(g_idx: Tensor) -> int | None:
    """The group size if `g_idx[i] == i // group_size` for all i, else None."""
    in_features = g_idx.numel()
    first_group = int((g_idx == 0).sum())
    if in_features == 0 or first_group == 0:
        return None
    expected = torch.arange(in_features, device=g_idx.device) // first_group
    return first_group if torch.equal(g_idx.long(), expected) else None


def static_group_size(g_idx: Tensor) -> int | None:
    """`find_static_group_size`, computed once per g_idx tensor (so once per layer).

    Keyed on the tensor object and its version counter, so an in-place change (loading a state
    dict into the buffer) is noticed. Inference tensors have no version counter: never cached.
    """
    key = id(g_idx)
    version = None if g_idx.is_inference() else g_idx._version
    hit = _group_sizes.get(key)
    if hit is not None and hit[0]() is g_idx and version is not None and hit[1] == version:
        return hit[2]
    size = find_static_group_size(g_idx)
    if hit is None or hit[0]() is not g_idx:
        # Drop the entry when the tensor dies, before its id can be reused.
        weakref.finalize(g_idx, _group_sizes.pop, key, None)
    _group_sizes[key] = (weakref.ref(g_idx), version, size)
    return size


def cpu_unsupported_reason(x: Tensor, g_idx: Tensor, bits: int) -> str | None:
    """Why the kernel cannot run this call (one line), or None when it can.

    Cheap after the first call per layer; does not build the kernel.
    """
    if x.device.type != "cpu":
        return f"tensors are on {x.device.type}; the native CPU kernel needs CPU tensors"
    if bits not in (2, 3, 4, 8):
        return f"bits={bits} is not supported"
    group_size = static_group_size(g_idx)
    if group_size is None:
        return "g_idx is not static groups (i // group_size), as in act-order checkpoints"
    if group_size % _BLOCK:
        return f"group size {group_size} is not a multiple of {_BLOCK}"
    return None


def cpu_gptq_linear(
    x: Tensor,
    qweight: Tensor,
    qzeros: Tensor,
    scales: Tensor,
    g_idx: Tensor,
    bits: int,
    in_features: int,
    bias: Tensor | None = None,
) -> Tensor:
    """`x @ W + bias` for a GPTQ-packed `W` with the native CPU kernel, accumulated in float32.

    Same contract as `memtool.ops.reference.gptq_linear`; results agree with it to float32
    rounding (the sums run in another order).

    Args:
        x: activations `[..., in_features]`, any float dtype (computed in float32).
        qweight: int32 `[in_features * bits // 32, out_features]`.
        qzeros: int32 `[n_groups, out_features * bits // 32]`, storing zero - 1.
        scales: `[n_groups, out_features]`.
        g_idx: int32 `[in_features]`; must be `i // group_size` (see `cpu_unsupported_reason`).
        bits: 2, 3, 4 or 8.
        in_features: input features of the layer.
        bias: optional `[out_features]`.

    Returns:
        `[..., out_features]` in `x.dtype`.

    Raises:
        MemtoolError: tensors that do not fit, a call the kernel does not handle, or a kernel
            that could not be built here.
    """
    out_features = check_gptq_tensors(qweight, qzeros, scales, g_idx, bits, in_features)
    check_linear_inputs(x, bias, qweight, in_features, out_features)
    reason = cpu_unsupported_reason(x, g_idx, bits)
    if reason is not None:
        raise MemtoolError(f"the cpu backend cannot run this call: {reason}")
    usable, why = cpu_kernel_status()
    if not usable:
        raise MemtoolError(f"the cpu backend cannot run here: {why}")
    # Decoding calls this ~200 times per token: the op handle is looked up once, and reshapes
    # and casts are skipped when they would do nothing.
    flat = x.dim() != 2
    rows = x.reshape(-1, in_features) if flat else x
    out = _gemm_op()(rows.float(), qweight, qzeros, scales, bias, bits, static_group_size(g_idx))
    if flat:
        out = out.view(*x.shape[:-1], out_features)
    return out if x.dtype == torch.float32 else out.to(x.dtype)


@functools.cache
def _gemm_op():
    # torch.ops resolves namespace attributes on every access (~5 us); the handle is stable.
    return torch.ops.memtool_cpu.gptq_gemm


def cpu_bitstack_linear(
    x: Tensor, signs: Tensor, u: Tensor, v: Tensor, in_features: int, bias: Tensor | None = None
) -> Tensor:
    """`x @ Wᵀ + bias` for a BitStack weight with the native CPU kernel, accumulated in float32.

    Same contract as `memtool.ops.reference.bitstack_linear`; results agree with it to float32
    rounding (the kernel sums the same products grouped per sign byte, in another order).

    Args:
        x: activations `[..., in_features]`, any float dtype (computed in float32).
        signs: uint8 `[blocks, out_features, ceil(in_features / 8)]`.
        u: `[blocks, out_features, rank]`, float16 or float32 read as stored (others converted).
        v: `[blocks, in_features, rank]`, likewise.
        in_features: input features of the layer.
        bias: optional `[out_features]`.

    Returns:
        `[..., out_features]` in `x.dtype`.

    Raises:
        MemtoolError: tensors that do not fit, tensors not on the CPU, or a kernel that could
            not be built here.
    """
    check_bitstack_tensors(signs, u, v, in_features)
    out_features = signs.shape[1]
    check_linear_inputs(x, bias, signs, in_features, out_features)
    if signs.device.type != "cpu" or u.device != signs.device or v.device != signs.device:
        raise MemtoolError(
            f"the cpu backend cannot run this call: tensors are on {signs.device.type}; the "
            f"native CPU kernel needs CPU tensors"
        )
    usable, why = cpu_kernel_status()
    if not usable:
        raise MemtoolError(f"the cpu backend cannot run here: {why}")
    flat = x.dim() != 2
    rows = x.reshape(-1, in_features) if flat else x
    out = _bitstack_op()(rows.float(), signs, u, v, bias, in_features)
    if flat:
        out = out.view(*x.shape[:-1], out_features)
    return out if x.dtype == torch.float32 else out.to(x.dtype)


@functools.cache
def _bitstack_op():
    return torch.ops.memtool_cpu.bitstack_gemv


__all__ = [
    "CPU_MAX_ROWS",
    "CPU_MAX_ROWS_BITSTACK",
    "build_dir",
    "cpu_bitstack_linear",
    "cpu_gptq_linear",
    "cpu_kernel_status",
    "cpu_unsupported_reason",
    "static_group_size",
]
