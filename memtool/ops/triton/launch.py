"""Checks every Triton kernel makes before launching: dtypes, devices, interpreter state."""

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
