"""The windowed neuron cache of one FFN layer ("LLM in a flash" §3.3, Figure 5).

One buffer of `capacity` bundles is allocated once. Rows `[0, n_used)` hold neurons, a pointer
array maps rows to neuron ids and back, and each row remembers the last token position that
used it. For token t, neurons unused in tokens t-K..t-1 (K = the window) are evicted first, by
overwriting them with the rows at the end of the used part (no reallocation, and the used part
stays one block); then the neurons of token t already present are hits, and the rest are read
from storage into the rows after the used part. If the window holds more than the buffer can
take, the least recently used rows go first; the current token's neurons always fit, because
selection caps them at the capacity.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from memtool.errors import MemtoolError

ReadFn = Callable[[list[int]], Tensor]  # sorted distinct ids -> uint8 [len(ids), stride_bytes]


class NeuronWindow:
    """Neuron bundles of one layer kept for the last `window_tokens` tokens.

    Args:
        n_neurons: neurons in the layer.
        capacity: rows in the buffer (at most `n_neurons`).
        stride_elems: elements per bundle row (the store's stride, padding included).
        dtype: the store's dtype.
        window_tokens: K: neurons used by any of the last K tokens stay; 0 keeps nothing.
    """

    def __init__(
        self, n_neurons: int, capacity: int, stride_elems: int, dtype, window_tokens: int
    ) -> None:
        if not 1 <= capacity <= n_neurons:
            raise MemtoolError(f"window capacity {capacity} must be in [1, {n_neurons}]")
        if window_tokens < 0:
            raise MemtoolError(f"--window must be 0 or more tokens, not {window_tokens}")
        self.capacity = capacity
        self.window_tokens = window_tokens
        self.buffer = torch.zeros(capacity, stride_elems, dtype=dtype)
        self.row_neuron = torch.full((capacity,), -1, dtype=torch.long)
        self.neuron_row = torch.full((n_neurons,), -1, dtype=torch.long)
        self.last_used = torch.full((capacity,), -1, dtype=torch.long)
        self.n_used = 0
        self.rows_moved = 0  # compaction copies over the window's life (memory management)

    @property
    def buffer_bytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    def neurons(self) -> Tensor:
        """Neuron id of each used row, in row order."""
        return self.row_neuron[: self.n_used]

    def clear(self) -> None:
        self._evict(torch.ones(self.n_used, dtype=torch.bool))

    def load(self, ids: Tensor, position: int, read: ReadFn) -> int:
        """Make neurons `ids` (sorted, distinct, at most `capacity`) resident for the token at
        `position`; returns the number of hits (the rest were read)."""
        if ids.numel() > self.capacity:
            raise MemtoolError(f"{ids.numel()} neurons asked of a window of {self.capacity}")
        self.evict_stale(position)
        misses = self.lookup(ids, position)
        self.make_room(misses.numel(), position)
        if misses.numel():
            self.insert(misses, read(misses.tolist()), position)
        return ids.numel() - misses.numel()

    def evict_stale(self, position: int) -> None:
        """Drop neurons no token of the window before `position` used."""
        stale = ~self._stays(self.last_used[: self.n_used], position)
        if bool(stale.any()):
            self._evict(stale)

    def kept(self, ids: Tensor, position: int) -> Tensor:
        """Which of `ids` are present and stay for the token at `position` (`evict_stale`
        drops the rest first); changes nothing."""
        rows = self.neuron_row[ids]
        kept = rows >= 0
        kept[kept.clone()] = self._stays(self.last_used[rows[kept]], position)
        return kept

    def _stays(self, last_used: Tensor, position: int) -> Tensor:
        """Rows last used at `last_used` are still in the window for the token at `position`."""
        return last_used >= position - self.window_tokens

    def lookup(self, ids: Tensor, position: int) -> Tensor:
        """Mark the present ones of `ids` used at `position`; returns the absent ones."""
        rows = self.neuron_row[ids]
        hit = rows >= 0
        self.last_used[rows[hit]] = position
        return ids[~hit]

    def make_room(self, count: int, position: int) -> bool:
        """Free rows for `count` more neurons by evicting the least recently used rows that
        `position` does not use; False (nothing evicted) when even that is not enough."""
        overflow = self.n_used + count - self.capacity
        if overflow <= 0:
            return True
        used = self.last_used[: self.n_used]
        evictable = used < position
        if int(evictable.sum()) < overflow:
            return False
        # Oldest first among rows the current token does not use (ties: lowest row).
        order = torch.argsort(torch.where(evictable, used, used.max() + 1), stable=True)
        victims = torch.zeros(self.n_used, dtype=torch.bool)
        victims[order[:overflow]] = True
        self._evict(victims)
        return True

    def insert(self, ids: Tensor, bundles: Tensor, position: int) -> None:
        """Append neurons `ids` (absent, and fitting) with their bundles (uint8 rows)."""
        start, end = self.n_used, self.n_used + ids.numel()
        if end > self.capacity:
            raise MemtoolError(f"window of {self.capacity} cannot take {ids.numel()} more")
        self.buffer[start:end] = bundles.view(self.buffer.dtype)
        self.row_neuron[start:end] = ids
        self.neuron_row[ids] = torch.arange(start, end)
        self.last_used[start:end] = position
        self.n_used = end

    def _evict(self, evict: Tensor) -> None:
        """Drop the used rows where `evict` is True, filling holes with rows from the end."""
        n = self.n_used
        keep = n - int(evict.sum())
        self.neuron_row[self.row_neuron[:n][evict]] = -1
        holes = torch.nonzero(evict[:keep]).flatten()
        movers = torch.nonzero(~evict[keep:]).flatten() + keep
        if holes.numel():
            self.buffer[holes] = self.buffer[movers]
            self.row_neuron[holes] = self.row_neuron[movers]
            self.last_used[holes] = self.last_used[movers]
            self.neuron_row[self.row_neuron[holes]] = holes
            self.rows_moved += holes.numel()
        self.row_neuron[keep:n] = -1
        self.last_used[keep:n] = -1
        self.n_used = keep
