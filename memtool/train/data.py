"""Which sequences each optimizer step trains on: a pure function of (seed, step).

Windows are reshuffled every epoch by a generator seeded with (seed, epoch), and step `s` takes
the next `batch_size` of that order (a batch may straddle two epochs). Because the schedule is
recomputed rather than iterated, a resumed run trains on exactly the windows the uninterrupted
run would have, and every rank agrees on them without communicating.
"""

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from memtool.errors import MemtoolError


class BatchSchedule:
    """Global batches over `windows` [n, seq_len]; each rank slices out its micro-batches."""

    def __init__(self, windows: torch.Tensor, batch_size: int, seed: int) -> None:
        if windows.shape[0] < batch_size:
            raise MemtoolError(
                f"the training data holds {windows.shape[0]} sequence(s) of "
                f"{windows.shape[1]} tokens, fewer than one batch of {batch_size}; use more "
                "text, a smaller --seq-len or a smaller --batch-size"
            )
        self.windows = windows
        self.batch_size = batch_size
        self.seed = seed
        self._orders: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            # a batch may straddle two epochs: keep the newest two orders
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = self._shuffle(epoch)
        return self._orders[epoch]

    def _shuffle(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.windows.shape[0], generator=generator)

    def batch(self, step: int) -> torch.Tensor:
        """The global batch of optimizer step `step` (0-based): [batch_size, seq_len]."""
        n = self.windows.shape[0]
        first = step * self.batch_size
        picks = []
        for position in range(first, first + self.batch_size):
            epoch, index = divmod(position, n)
            picks.append(int(self._order(epoch)[index]))
        return self.windows[picks]

    def micro_batches(
        self, step: int, rank: int, world_size: int, grad_accum: int
    ) -> list[torch.Tensor]:
        """This rank's `grad_accum` micro-batches of step `step` (rank-major slices)."""
        per_rank = self.batch(step).chunk(world_size)[rank]
        return list(per_rank.chunk(grad_accum))


def load_token_file(path: Path, seq_len: int) -> torch.Tensor:
    """Pre-tokenized data: a safetensors file whose `input_ids` is a 1-D token stream (cut into
    aligned `seq_len` windows, remainder dropped) or 2-D windows of exactly `seq_len`."""
    try:
        ids = load_file(str(path)).get("input_ids")
    except (OSError, SafetensorError) as exc:
        raise MemtoolError(f"cannot read token file {path}: {exc}") from None
    if ids is None or ids.is_floating_point() or ids.dim() not in (1, 2):
        raise MemtoolError(
            f"{path} must hold an integer tensor `input_ids` of shape [tokens] or [n, seq_len]"
        )
    ids = ids.long()
    if ids.dim() == 2:
        if ids.shape[1] != seq_len:
            raise MemtoolError(
                f"{path} holds windows of {ids.shape[1]} tokens; use --seq-len {ids.shape[1]}"
            )
        return ids
    n = ids.numel() // seq_len
    if n == 0:
        raise MemtoolError(f"{path} has {ids.numel()} tokens, fewer than --seq-len {seq_len}")
    return ids[: n * seq_len].view(n, seq_len).clone()


def is_token_file(spec: str) -> bool:
    return spec.endswith(".safetensors")
