"""BitStack's sign feedback, one block of input columns, in Triton (the GPU twin of
`memtool/ops/cpu/sign_feedback.cpp`).

Specification: the Python loop of `memtool.compress.bitstack.feedback_signs`. For each input
column j of the block in turn: take the sign of the residual as updated so far, store the
error it leaves, `(r_j - s_j m_j) / h_jj`, and subtract `h_jk` times that error from every later
column k of the block. On CUDA tensors the Python loop is four kernel launches per column on
vectors of a few thousand floats: launch overhead, for every column of every block of every
linear (a 7B model: ~15 million column steps).

Every output row is independent of the others, so one program owns `BLOCK_N` output rows and
runs the whole column loop on them, the block's `BLOCK_C x BLOCK_N` residual tile held in
registers: column j is read out of the tile by a masked sum (one non-zero term, so exact), and
the update is the outer product of row j of the inverse Hessian's factor, zeroed at and before
j, with the errors (rows at and before j get exactly zero subtracted). The float32 operations
per element are the specification's, in its order, except that whether the update `r_k - h_jk
e_j` is one fused multiply-add (one rounding) or two is up to the backend: torch's CPU `addr_`
may fuse it, the interpreter (numpy) does not, a GPU compiler may. So the errors agree to
float32 rounding, and a residual within a rounding of zero could take the other sign; the tests
check on CPU, under the interpreter, that the signs equal the Python loop's and the errors
agree to 1e-5.

`triton` reads `TRITON_INTERPRET` when it is first imported: set it before Python starts to run
on CPU tensors.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from memtool.errors import MemtoolError
from memtool.ops import triton_interpreting
from memtool.ops.triton.launch import ceil_div, next_power_of_2

# Output rows per program: the tile is BLOCK_C x BLOCK_N float32 in registers (128 x 32 for
# GPTQ's default block of 128 columns: 32 registers a thread at 4 warps).
BLOCK_N = 32


@triton.jit
def _sign_feedback_kernel(rest_ptr, magnitude_ptr, hinv_ptr, negative_ptr, err_ptr,
                          COLUMNS, ROWS, BLOCK_C: tl.constexpr,
                          BLOCK_N: tl.constexpr):  # fmt: skip
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_C)
    n_mask = offs_n < ROWS
    c_mask = offs_c < COLUMNS
    tile_offs = offs_c[:, None] * ROWS + offs_n[None, :]
    tile = tl.load(rest_ptr + tile_offs, mask=c_mask[:, None] & n_mask[None, :], other=0.0)
    for j in range(0, COLUMNS):
        row = tl.sum(tl.where(offs_c[:, None] == j, tile, 0.0), axis=0)
        magnitude = tl.load(magnitude_ptr + j * ROWS + offs_n, mask=n_mask, other=0.0)
        below = row < 0.0
        diagonal = tl.load(hinv_ptr + j * COLUMNS + j)
        err = (row - tl.where(below, -magnitude, magnitude)) / diagonal
        tl.store(negative_ptr + j * ROWS + offs_n, below.to(tl.int8), mask=n_mask)
        tl.store(err_ptr + j * ROWS + offs_n, err, mask=n_mask)
        later = (offs_c > j) & c_mask
        weight = tl.load(hinv_ptr + j * COLUMNS + offs_c, mask=later, other=0.0)
        tile = tile - weight[:, None] * err[None, :]


def triton_sign_feedback_block(
    rest: Tensor, magnitude: Tensor, hinv: Tensor, negative: Tensor, err: Tensor
) -> None:
    """One block of the sign feedback, in place: the arguments and layout of the native CPU op
    `memtool_cpu.sign_feedback_block` (`[columns, rows]` float32 residual, magnitudes and
    errors, `[columns, columns]` inverse Hessian factor block, `[columns, rows]` bool signs, set
    where negative). `rest` is used as scratch and left as the tile's input, not updated."""
    columns, rows = rest.shape
    for name, tensor in (("rest", rest), ("magnitude", magnitude), ("err", err)):
        if tensor.shape != rest.shape or not tensor.is_contiguous():
            raise MemtoolError(f"{name} must be contiguous [columns, rows] like rest")
    if hinv.shape != (columns, columns) or not hinv.is_contiguous():
        raise MemtoolError("hinv must be a contiguous [columns, columns] block")
    if negative.shape != rest.shape or not negative.is_contiguous():
        raise MemtoolError("negative must be contiguous [columns, rows] like rest")
    if rest.device.type == "cpu" and not triton_interpreting():
        raise MemtoolError(
            "CPU tensors need the Triton interpreter, but triton was imported for the GPU: "
            "set TRITON_INTERPRET=1 before Python starts"
        )
    _sign_feedback_kernel[(ceil_div(rows, BLOCK_N),)](
        rest, magnitude, hinv, negative.view(torch.int8), err,
        columns, rows, BLOCK_C=next_power_of_2(columns), BLOCK_N=BLOCK_N,
    )  # fmt: skip
