"""Host-side helpers of every Triton launch: checks (dtypes, devices, interpreter state) and
grid arithmetic."""

import torch
from torch import Tensor

from memtool.errors import MemtoolError
from memtool.ops import triton_interpreting

DOT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_launch(kernel: str, x: Tensor, anchor: Tensor, others: dict[str, Tensor]) -> None:
    """Raise `MemtoolError` unless `kernel` (a name for messages) can run on `x`.

    Args:
        kernel: "GPTQ", "BitStack", ... as the messages should name it.
        x: the activations.
        anchor: the tensor the others must share a device with (the packed weight).
        others: the layer's other tensors, by argument name.
    """
    if x.dtype not in DOT_DTYPES:
        raise MemtoolError(
            f"the Triton {kernel} kernel takes float16/bfloat16/float32 x, not {x.dtype}"
        )
    for name, tensor in others.items():
        if tensor.device != anchor.device:
            raise MemtoolError(f"{name} is on {tensor.device} but the weight is on {anchor.device}")
    interpreted = triton_interpreting()
    if x.device.type == "cpu" and not interpreted:
        raise MemtoolError(
            "CPU tensors need the Triton interpreter, but triton was imported for the GPU: "
            "set TRITON_INTERPRET=1 before Python starts"
        )
    if interpreted and x.dtype == torch.bfloat16:
        # triton-lang/triton#11584: the interpreter's tl.dot multiplies bfloat16 bit patterns.
        raise MemtoolError("the Triton interpreter does not support bfloat16 dots; use a GPU")


def ceil_div(a: int, b: int) -> int:
    """`ceil(a / b)` for grids. Not `triton.cdiv`: in triton 3.x that is a constexpr function
    whose Python call goes through the JIT's argument handling, several microseconds each, and
    a decode-sized launch computes a few of them."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= `n` (1 for n <= 1); plain Python, as `ceil_div`."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
