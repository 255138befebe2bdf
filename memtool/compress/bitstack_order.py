"""Ordering every linear's residual blocks into one stack, so that any prefix is a model.

Each linear's first block is always loaded (a linear with no block would output zeros); the
stack then holds every other block, and a linear's blocks stay in their own order (block k+1
refines the residual block k left). What varies is how linears interleave.

- `importance` (default): greedy by estimated loss reduction per byte. `errors[k]` is a linear's
  estimated loss increase with k blocks loaded (`memtool.compress.bitstack_scaling`), so block k
  is worth `errors[k-1] - errors[k]` for its bytes. Because a linear's blocks must come in
  order, a linear competes with the best average gain over its next few blocks (the upper
  concave envelope): a small gain followed by a large one is still taken in time.
- `uniform`: level by level (every linear's second block, then every third, ...), the official
  code's order when it skips its perplexity sorting.

The official code sorts by measuring perplexity with each linear one level up, (niter-1) x
linears evaluations; here the estimate costs one forward-backward over a few windows and a
matrix product per block, computed while decomposing.
"""

import heapq
from dataclasses import dataclass

from memtool.errors import MemtoolError

ORDERS = ("importance", "uniform")


@dataclass(frozen=True)
class LinearBlocks:
    """What ordering needs to know about one linear's blocks."""

    block_bytes: int
    errors: tuple[float, ...]  # errors[k]: estimated loss increase with k blocks (len niter+1)

    @property
    def niter(self) -> int:
        return len(self.errors) - 1


def order_stack(linears: list[LinearBlocks], order: str) -> list[tuple[int, int]]:
    """The stack as `(linear index, block index)` pairs: every linear's block 0 first, in
    linear order, then the remaining blocks in `order`."""
    if order not in ORDERS:
        raise MemtoolError(f"unknown stack order {order!r}: use one of {', '.join(ORDERS)}")
    stack = [(index, 0) for index in range(len(linears))]
    if order == "uniform":
        depth = max((item.niter for item in linears), default=0)
        for level in range(1, depth):
            stack += [(i, level) for i, item in enumerate(linears) if level < item.niter]
        return stack
    heap = [
        (-_best_rate(item, 1), index, 1) for index, item in enumerate(linears) if item.niter > 1
    ]
    heapq.heapify(heap)
    while heap:
        _, index, level = heapq.heappop(heap)
        stack.append((index, level))
        item = linears[index]
        if level + 1 < item.niter:
            heapq.heappush(heap, (-_best_rate(item, level + 1), index, level + 1))
    return stack


def _best_rate(item: LinearBlocks, level: int) -> float:
    """Best mean gain per byte of loading blocks `level .. end-1` next, over every `end`
    (block b takes the error from errors[b] to errors[b + 1])."""
    start = item.errors[level]
    best = float("-inf")
    for end in range(level + 1, item.niter + 1):
        best = max(best, (start - item.errors[end]) / ((end - level) * item.block_bytes))
    return best
