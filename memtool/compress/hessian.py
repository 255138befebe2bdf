"""Accumulating each linear layer's input Hessian H = 2 XᵀX / n over calibration batches.

Linears that read the very same input tensor (q/k/v after the attention norm, gate/up after the
MLP norm) share one accumulator: the products are computed once, and GPTQ can quantize their
stacked rows in one call, since rows are independent given H.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from memtool.compress.layers import StopLayer


@dataclass
class HessianGroup:
    """Linears that share one input, and the Hessian of that input."""

    names: list[str]
    hessian: torch.Tensor
    n_rows: int = 0  # input vectors accumulated

    def add(self, x: torch.Tensor) -> None:
        self.n_rows = add_second_moment(self.hessian, self.n_rows, x, factor=2.0)


# Row blocks of the lower triangle in `add_second_moment`: xᵀx is symmetric and torch has no
# syrk, so three row blocks (each against the columns up to its own end) do 2/3 of a full
# product's work; measured on 2 cores with 4096 rows: 576 wide 19 -> 12 ms, 1536 wide 131 ->
# 93 ms (more blocks: smaller, slower products). Narrow inputs take one product.
_SYMMETRIC_BLOCKS = 3
_SYMMETRIC_MIN_WIDTH = 384


def add_second_moment(
    matrix: torch.Tensor, n_rows: int, x: torch.Tensor, factor: float = 1.0
) -> int:
    """Fold the rows of `x` `[..., d]` into `matrix`, the running mean of `factor * xxᵀ` over
    `n_rows` rows so far, in place; returns the new row count."""
    x = x.reshape(-1, x.shape[-1]).float()
    total = n_rows + x.shape[0]
    alpha = factor / total
    matrix.mul_(n_rows / total)
    d = x.shape[1]
    if d < _SYMMETRIC_MIN_WIDTH:
        matrix.addmm_(x.T, x, alpha=alpha)  # no copy of x
        return total
    step = -(-d // _SYMMETRIC_BLOCKS)
    for start in range(0, d, step):
        stop = min(start + step, d)
        matrix[start:stop, :stop].addmm_(x[:, start:stop].T, x[:, :stop], alpha=alpha)
        # Mirror the part left of the diagonal block (the block itself is a full product).
        matrix[:start, start:stop].copy_(matrix[start:stop, :start].T)
    return total


def inverse_hessian_factor(
    hessian: torch.Tensor, damp_percent: float, max_damp_percent: float
) -> tuple[torch.Tensor | None, float]:
    """Upper Cholesky factor of H⁻¹ with automatic dampening; None if H stays indefinite.

    Dampening starts at `damp_percent` of the mean diagonal and grows tenfold per failed
    factorisation, up to `max_damp_percent`; returns the factor and the dampening used.
    """
    mean_diag = torch.mean(torch.diag(hessian)).item()
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    damp = damp_percent
    while damp <= max_damp_percent * (1 + 1e-9):
        factor, info = torch.linalg.cholesky_ex(hessian + damp * mean_diag * eye)
        if info.item() == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info.item() == 0 and torch.isfinite(upper).all():
                return upper, damp
        damp *= 10
    return None, damp


class LinearHooks(ABC):
    """Context manager: `self._hook(name)` on each of `self.linears` while open, as a forward
    hook `(module, args, output)`, or as a pre-hook `(module, args)` where `PRE_HOOKS`."""

    linears: dict[str, nn.Linear]
    PRE_HOOKS: ClassVar[bool] = False

    @abstractmethod
    def _hook(self, name: str):
        """The hook that records linear `name`'s input."""

    def __enter__(self):
        self._handles = [
            (m.register_forward_pre_hook if self.PRE_HOOKS else m.register_forward_hook)(
                self._hook(n)
            )
            for n, m in self.linears.items()
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()


@dataclass
class HessianCollector(LinearHooks):
    """Hooks on a layer's linears that accumulate their input Hessians.

    They run before each linear (pre-hooks): once the last linear of the layer has been
    recorded in a batch, nothing after it is needed, and the hook ends that batch's forward with
    `StopLayer` (which `LayerInputs.run` expects). On a Llama layer that skips down_proj's
    product, a quarter of the layer's compute.

    With `max_groups=1` only the first group reached is recorded (true-sequential GPTQ: the
    next group is calibrated only once this one is quantized): the forward ends at the first
    linear outside it, and in later batches as soon as the group's last linear is reached.
    """

    linears: dict[str, nn.Linear]
    max_groups: int | None = None
    groups: list[HessianGroup] = field(default_factory=list)
    _by_name: dict[str, HessianGroup] = field(default_factory=dict)
    _last: tuple[torch.Tensor, HessianGroup] | None = None
    _seen: set[str] = field(default_factory=set)
    # Linears recorded per batch before it can end: all of them, or with `max_groups`, those of
    # the groups found, once the first batch has shown where they end.
    _per_batch: int | None = None
    PRE_HOOKS: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.max_groups is None:
            self._per_batch = len(self.linears)

    def _end_batch(self):
        self._seen.clear()
        self._last = None
        return StopLayer()

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            if name in self._seen:  # a new batch after one that did not end early
                self._seen.clear()
                if self.max_groups is not None:
                    self._per_batch = len(self._by_name)
            group = self._by_name.get(name)
            if group is None:
                # First batch: join the previous linear's group if it saw this same tensor.
                if self._last is not None and self._last[0] is x:
                    group = self._last[1]
                    group.names.append(name)
                elif self.max_groups is not None and len(self.groups) == self.max_groups:
                    self._per_batch = len(self._by_name)  # the groups wanted are complete
                    raise self._end_batch()
                else:
                    dim = x.shape[-1]
                    group = HessianGroup([name], torch.zeros(dim, dim, dtype=torch.float32))
                    self.groups.append(group)
                self._by_name[name] = group
            if self._last is None or self._last[0] is not x:
                group.add(x)
            self._last = (x, group)
            self._seen.add(name)
            if len(self._seen) == self._per_batch:
                raise self._end_batch()

        return hook
