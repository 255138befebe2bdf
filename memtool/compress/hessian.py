"""Accumulating each linear layer's input Hessian H = 2 XᵀX / n over calibration batches.

Linears that read the very same input tensor (q/k/v after the attention norm, gate/up after the
MLP norm) share one accumulator: the products are computed once, and GPTQ can quantize their
stacked rows in one call, since rows are independent given H.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class HessianGroup:
    """Linears that share one input, and the Hessian of that input."""

    names: list[str]
    hessian: torch.Tensor
    n_rows: int = 0  # input vectors accumulated

    def add(self, x: torch.Tensor) -> None:
        self.n_rows = add_second_moment(self.hessian, self.n_rows, x, factor=2.0)


def add_second_moment(
    matrix: torch.Tensor, n_rows: int, x: torch.Tensor, factor: float = 1.0
) -> int:
    """Fold the rows of `x` `[..., d]` into `matrix`, the running mean of `factor * xxᵀ` over
    `n_rows` rows so far, in place; returns the new row count."""
    x = x.reshape(-1, x.shape[-1]).float()
    # Rescale the old mean and add the new batch in one addmm (no copy of x).
    total = n_rows + x.shape[0]
    matrix.mul_(n_rows / total).addmm_(x.T, x, alpha=factor / total)
    return total


class LinearHooks(ABC):
    """Context manager: `self._hook(name)`'s forward hook on each of `self.linears` while open."""

    linears: dict[str, nn.Linear]

    @abstractmethod
    def _hook(self, name: str):
        """The forward hook that records linear `name`'s input."""

    def __enter__(self):
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.linears.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()


@dataclass
class HessianCollector(LinearHooks):
    """Forward hooks on a layer's linears that accumulate their input Hessians."""

    linears: dict[str, nn.Linear]
    groups: list[HessianGroup] = field(default_factory=list)
    _by_name: dict[str, HessianGroup] = field(default_factory=dict)
    _last: tuple[torch.Tensor, HessianGroup] | None = None

    def _hook(self, name: str):
        def hook(module, args, output):
            x = args[0]
            group = self._by_name.get(name)
            if group is None:
                # First batch: join the previous linear's group if it saw this same tensor.
                if self._last is not None and self._last[0] is x:
                    group = self._last[1]
                    group.names.append(name)
                else:
                    dim = x.shape[-1]
                    group = HessianGroup([name], torch.zeros(dim, dim, dtype=torch.float32))
                    self.groups.append(group)
                self._by_name[name] = group
            if self._last is None or self._last[0] is not x:
                group.add(x)
            self._last = (x, group)

        return hook
