"""Child process for kernel tests: runs ops under the Triton interpreter (see conftest.py).

Usage: python interpret_worker.py JOBS.pt RESULTS.pt

Jobs and results travel through `torch.save`/`torch.load` (weights-only), so a `Packed` travels
as a dict of its fields, and `adamw_step`, which returns nothing, reports its updated buffers.
"""

import dataclasses
import os
import sys

# Before anything imports triton: triton reads this once, at its own import.
os.environ["TRITON_INTERPRET"] = "1"

import torch

from memtool.errors import MemtoolError
from memtool.ops import (
    Packed,
    adamw_step,
    backend_used,
    bitstack_linear,
    gptq_linear,
    pack_activation,
    pack_backend_used,
    train_backend_used,
    unpack_activation,
)

ADAMW_BUFFERS = ("param_fp32", "exp_avg", "exp_avg_sq", "out_lowp")


def _linear(op):
    def run(kwargs: dict, backend: str):
        chosen = backend_used(kwargs["x"].device, backend, kwargs["x"].dtype)
        return op(**kwargs, backend=backend), chosen

    return run


def _pack(kwargs: dict, backend: str):
    chosen = pack_backend_used(kwargs["x"].device, kwargs["fmt"], backend)
    return dataclasses.asdict(pack_activation(**kwargs, backend=backend)), chosen


def _unpack(kwargs: dict, backend: str):
    packed = Packed(**kwargs["packed"])
    chosen = train_backend_used(packed.data.device, backend)
    return unpack_activation(packed, backend=backend), chosen


def _adamw(kwargs: dict, backend: str):
    chosen = train_backend_used(kwargs["param_fp32"].device, backend)
    adamw_step(**kwargs, backend=backend)
    return {name: kwargs[name] for name in ADAMW_BUFFERS if kwargs.get(name) is not None}, chosen


def _gptq_path(kwargs: dict, backend: str):
    """The Triton GPTQ entry point itself, so a test can pick its path and tiles."""
    from memtool.ops import KernelBackend
    from memtool.ops.triton.gptq_matmul import triton_gptq_linear
    from memtool.ops.triton.tiles import Tiles

    if kwargs.get("tiles") is not None:  # travels as a plain tuple (weights-only loading)
        kwargs = {**kwargs, "tiles": Tiles(*kwargs["tiles"])}
    return triton_gptq_linear(**kwargs), KernelBackend.TRITON


def _gptq_dequantize(kwargs: dict, backend: str):
    from memtool.ops import KernelBackend
    from memtool.ops.triton.gptq_matmul import triton_dequantize_gptq

    return triton_dequantize_gptq(**kwargs), KernelBackend.TRITON


def _bitstack_path(kwargs: dict, backend: str):
    """The Triton BitStack entry point itself, so a test can pick its path."""
    from memtool.ops import KernelBackend
    from memtool.ops.triton.bitstack_matmul import triton_bitstack_linear

    return triton_bitstack_linear(**kwargs), KernelBackend.TRITON


def _feedback(kwargs: dict, backend: str):
    """BitStack's sign feedback through its Triton block loop; its signs and row errors."""
    from memtool.compress.bitstack import feedback_signs
    from memtool.ops import KernelBackend

    row_error = torch.zeros(kwargs["rest"].shape[0])
    signs = feedback_signs(**kwargs, loop="triton", row_error=row_error)
    return {"signs": signs, "row_error": row_error}, KernelBackend.TRITON


OPS = {
    "gptq_linear": _linear(gptq_linear),
    "triton_bitstack_linear": _bitstack_path,
    "triton_gptq_linear": _gptq_path,
    "triton_dequantize_gptq": _gptq_dequantize,
    "bitstack_linear": _linear(bitstack_linear),
    "pack_activation": _pack,
    "unpack_activation": _unpack,
    "adamw_step": _adamw,
    "feedback_signs": _feedback,
}


def main(jobs_path: str, results_path: str) -> None:
    results = []
    for job in torch.load(jobs_path):
        run = OPS[job.get("op", "gptq_linear")]
        try:
            out, chosen = run(job["kwargs"], job["backend"])
        except MemtoolError as error:
            results.append({"error": str(error)})
        else:
            results.append({"out": out, "backend": chosen.value})
    torch.save(results, results_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
