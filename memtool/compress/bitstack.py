"""BitStack's iterative absolute-value decomposition of one weight matrix.

Paper: Wang et al., "BitStack: Any-Size Compression of Large Language Models in Variable Memory
Environments" (ICLR 2025). A weight `W` (already scaled by its input's activation statistics,
see `memtool.compress.bitstack_scaling`) is peeled into residual blocks: repeat `niter` times

    S = sign(R) (zeros as +1);  |R| ≈ u vᵀ (rank K);  store S at 1 bit + u, v in fp16;
    R ← R - S ⊙ (u vᵀ)

so any number of leading blocks is an approximation of `W`, better with every block.

What memtool does differently, and why:
- The rank is chosen per shape (`auto_rank`) so that every block costs about the same bits per
  weight (default 1.25): a fixed K=16 suits 4096-wide models; on a 576-wide model it makes
  the factors cost more than the signs.
- `|R|` is factored by randomized SVD (Halko et al., 4 power iterations) instead of a full SVD:
  on smollm2-135m's gate_proj, 8 blocks at rank 5 leave the same residual (0.09851 vs 0.09851
  of ‖W‖) in a quarter of the time.
- The residual subtracts what is stored (factors rounded to fp16), not the float32 factors,
  so later blocks correct the rounding of earlier ones (`residual="fp32"` keeps the paper's
  choice, for the ablation in BENCHMARKS.md).
- Each block's effect on the model's loss is estimated while decomposing (see
  `memtool.compress.bitstack_order`), which replaces the official code's hours of perplexity
  evaluations for ordering.
- Magnitudes weighted by output rows (`row_weight`, on by default in the pipeline): the rank-K
  fit of `|R|` minimises the error with each row weighted by the square root of its output
  channel's mean squared loss gradient, the output side of the diagonal K-FAC estimate whose
  input side the activation scales already are. The paper's unweighted fit spends the
  factors evenly on rows whose errors cost the loss very differently (on smollm2-135m the
  row weights of q/k/up spread 0.06-34x their mean); lower perplexity at every size on wiki
  and code there. It costs nothing at inference (the weight is folded into `u`).
- Signs with error feedback (`feedback_signs`, on by default): chosen column by column as GPTQ
  rounds, each column's error spread over the later columns through the inverse input
  Hessian, so a block cuts the layer's output error rather than the weight error; on
  smollm2-135m wiki perplexity at 104 MB falls from 94 to 40 (BENCHMARKS.md).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from memtool.errors import MemtoolError
from memtool.formats.bitstack_pack import pack_signs
from memtool.ops import triton_status
from memtool.ops.cpu import cpu_kernel_status

FACTOR_DTYPE = torch.float16
_POWER_ITERATIONS = 4
_OVERSAMPLE = 6


@dataclass
class Block:
    """One residual block: packed signs `[out, ceil(in / 8)]` and factors `[out|in, rank]`."""

    signs: Tensor
    u: Tensor
    v: Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.signs, self.u, self.v))


def block_bits_per_weight(out_features: int, in_features: int, rank: int) -> float:
    """Bits per weight of one block: 1 for the sign plus 16 K (m + n) / (m n) for the factors."""
    return 1 + 16 * rank * (out_features + in_features) / (out_features * in_features)


def auto_rank(out_features: int, in_features: int, block_bits: float) -> int:
    """The rank whose block costs closest to `block_bits` bits per weight (at least 1)."""
    spare = (block_bits - 1) * out_features * in_features / (16 * (out_features + in_features))
    return max(1, min(round(spare), out_features, in_features))


def check_rank(out_features: int, in_features: int, rank: int, name: str) -> None:
    if not 1 <= rank <= min(out_features, in_features):
        raise MemtoolError(
            f"--rank {rank} does not fit {name} ({out_features}x{in_features}): the rank must be "
            f"between 1 and {min(out_features, in_features)}"
        )


def low_rank(magnitude: Tensor, rank: int, exact: bool) -> tuple[Tensor, Tensor]:
    """(u, v): `u vᵀ` is the best rank-`rank` fit of `magnitude`; sqrt(sigma) on each side."""
    if exact or rank + _OVERSAMPLE >= min(magnitude.shape):
        left, sigma, right_t = torch.linalg.svd(magnitude, full_matrices=False)
        right = right_t.T
    else:
        left, sigma, right = torch.svd_lowrank(
            magnitude, q=rank + _OVERSAMPLE, niter=_POWER_ITERATIONS
        )
    root = sigma[:rank].sqrt()
    return left[:, :rank] * root, right[:, :rank] * root


FEEDBACK_LOOPS = ("python", "cpu", "triton")


def _feedback_loop(device: torch.device) -> str:
    if device.type == "cpu" and cpu_kernel_status()[0]:
        return "cpu"
    if device.type == "cuda" and triton_status(device)[0]:
        return "triton"
    return "python"


def feedback_signs(
    rest: Tensor,
    magnitude: Tensor,
    hinv_upper: Tensor,
    block_size: int = 128,
    loop: str | None = None,
    row_error: Tensor | None = None,
) -> Tensor:
    """Signs `[out, in]` (±1) for `magnitude` chosen column by column with GPTQ's error feedback.

    Column c takes the sign of the residual as updated so far; the error it leaves,
    `R[:, c] - S[:, c] M[:, c]`, is spread over the columns not yet chosen through the upper
    Cholesky factor of the inverse input Hessian (as GPTQ spreads rounding errors), so the
    block minimises the layer's output error on the calibration inputs rather than the weight
    error. `sign(R)` (no feedback) is the special case of a diagonal Hessian.

    The loop within each block of columns (`loop`) is this function's Python code below
    (`"python"`, the specification), the same loop in C++ (`"cpu"`,
    `memtool/ops/cpu/sign_feedback.cpp`) or in Triton (`"triton"`,
    `memtool/ops/triton/sign_feedback.py`). None picks: C++ for CPU tensors where memtool's
    native kernels build, Triton for CUDA tensors where triton is installed, else Python.

    `row_error` (`[out]`, optional) gets each row's output error under the dampened Hessian
    added to it: with `U` the upper factor (`H⁻¹ = UᵀU`), the block leaves `R - S ⊙ M = Err U`
    (Err the scaled per-column errors below), so `(R - S⊙M) H (R - S⊙M)ᵀ = Err Errᵀ`: a sum of
    squares the loop has already computed, where the direct product costs `out x in x in`.
    """
    loop = loop or _feedback_loop(rest.device)
    if loop not in FEEDBACK_LOOPS:
        choices = ", ".join(FEEDBACK_LOOPS)
        raise MemtoolError(f"sign feedback loop {loop!r}: choose one of {choices}")
    if loop == "triton":
        from memtool.ops.triton.sign_feedback import triton_sign_feedback_block
    wt = rest.T.contiguous()  # an input column per row: contiguous per-column steps
    mt = magnitude.T.contiguous()
    in_features, out_features = wt.shape
    negative = torch.empty(in_features, out_features, dtype=torch.bool, device=rest.device)
    for start in range(0, in_features, block_size):
        stop = min(start + block_size, in_features)
        hinv_block = hinv_upper[start:stop, start:stop].contiguous()
        err_block = torch.empty(stop - start, out_features, device=rest.device)
        if loop == "cpu":
            torch.ops.memtool_cpu.sign_feedback_block(
                wt[start:stop], mt[start:stop], hinv_block, negative[start:stop], err_block
            )
        elif loop == "triton":
            triton_sign_feedback_block(
                wt[start:stop], mt[start:stop], hinv_block, negative[start:stop], err_block
            )
        else:
            for j in range(stop - start):
                col = start + j
                row = wt[col]
                below = row < 0
                negative[col] = below
                err = (row - torch.where(below, -mt[col], mt[col])).div_(hinv_block[j, j])
                err_block[j] = err
                wt[col + 1 : stop].addr_(hinv_block[j, j + 1 :], err, alpha=-1)
        wt[stop:].addmm_(hinv_upper[start:stop, stop:].T, err_block, alpha=-1)
        if row_error is not None:
            row_error += err_block.square().sum(dim=0)
    return torch.where(negative.T, -1.0, 1.0)


def decompose(
    weight: Tensor,
    niter: int,
    rank: int,
    *,
    residual: str = "fp16",
    exact_svd: bool = False,
    error: Callable[..., float] | None = None,
    hinv_upper: Tensor | None = None,
    row_weight: Tensor | None = None,
) -> tuple[list[Block], list[float]]:
    """Peel `weight` `[out, in]` into `niter` residual blocks.

    Args:
        weight: the (scaled) float weight.
        niter: number of blocks.
        rank: rank of each block's factors.
        residual: "fp16" subtracts the stored (rounded) factors; "fp32" the unrounded ones.
        exact_svd: full SVD instead of randomized (which draws from torch's global generator:
            seed it for reproducible stacks).
        error: maps a residual to a scalar (the estimated loss increase it causes); called on
            the weight itself and after each block, with feedback also given each row's output
            error under the dampened Hessian (`feedback_signs`'s `row_error`), from which
            `memtool.compress.bitstack_scaling.loss_estimator` gets the estimate without its
            matrix product.
        hinv_upper: upper Cholesky factor of the inverse Hessian of the (scaled) weight's
            inputs: choose each block's signs with error feedback (`feedback_signs`); None:
            `sign(R)`.
        row_weight: `[out]` positive weights: fit each block's magnitudes to `diag(t) |R|`, so
            rows that count more are fitted more closely, and store `u / t` (the signs, and
            with them the feedback, do not change with a row's scale). `error` still sees the
            unweighted residual.

    Returns:
        (blocks, errors) with `errors[k]` the error after k blocks (`niter + 1` values; empty
        when `error` is None).
    """
    if residual not in ("fp16", "fp32"):
        raise MemtoolError(f"residual must be fp16 or fp32, got {residual!r}")
    rest = weight.detach().float().clone()
    errors = [error(rest)] if error is not None else []
    weight_col = None
    if row_weight is not None:
        # Decompose diag(t) W: the magnitude fit favours the rows that count most; each
        # block's u is stored divided by t, which scales the block's rows back exactly.
        weight_col = row_weight.float().view(-1, 1)
        rest.mul_(weight_col)
        if error is not None:
            error = _unweighted(error, weight_col)
    blocks = []
    for _ in range(niter):
        rows = None  # with feedback: each row's output error under the dampened Hessian
        u, v = low_rank(rest.abs(), rank, exact_svd)
        stored_u = u if weight_col is None else u / weight_col
        u16, v16 = stored_u.to(FACTOR_DTYPE), v.to(FACTOR_DTYPE)
        if residual == "fp16":
            back = u16.float() if weight_col is None else u16.float() * weight_col
            magnitude = back @ v16.float().T
        else:
            magnitude = u @ v.T
        if hinv_upper is None:
            blocks.append(Block(pack_signs(rest), u16.contiguous(), v16.contiguous()))
            # sign(R) with zeros as +1, applied without materialising S.
            rest.sub_(torch.where(rest < 0, -magnitude, magnitude))
        else:
            if error is not None:
                rows = torch.zeros(rest.shape[0], dtype=torch.float64, device=rest.device)
            signs = feedback_signs(rest, magnitude, hinv_upper, row_error=rows)
            blocks.append(Block(pack_signs(signs), u16.contiguous(), v16.contiguous()))
            rest.sub_(signs.mul_(magnitude))
        if error is not None:
            errors.append(error(rest) if rows is None else error(rest, rows))
    return blocks, errors


def _unweighted(error: Callable[..., float], weight_col: Tensor) -> Callable[..., float]:
    """`error` for residuals of `diag(t) W`: shown the residual, and the feedback's row errors,
    of `W` itself."""
    square = weight_col.view(-1).double().square()

    def unweighted(residual: Tensor, rows: Tensor | None = None) -> float:
        if rows is None:
            return error(residual / weight_col)
        return error(residual / weight_col, rows / square)

    return unweighted
