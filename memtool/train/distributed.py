"""The process group: the same command line for one process or many.

Launched by `torchrun` (or `accelerate launch`) the environment names the rank, world size and
rendezvous; run plainly, memtool makes a group of one over a private file store, so every code
path (ZeRO sharding, FSDP2) is the same whether one process runs or many. gloo on CPU, NCCL on
CUDA.
"""

import contextlib
import datetime
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from memtool.errors import MemtoolError

_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier()

    def all_reduce_max(self, value: float) -> float:
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor.item())

    def gather_objects(self, obj: object) -> list[object]:
        """Every rank's `obj`, in rank order (on every rank)."""
        out: list[object] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def _launched() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@contextlib.contextmanager
def process_group(device: str | None = None) -> Iterator[Dist]:
    """Join (or make) the default process group for the block; tear down what it made.

    A caller that already initialised torch.distributed (its own torchrun program) keeps its
    group: memtool uses it and leaves it up.

    Args:
        device: "cpu", "cuda" or None (CUDA when available, else CPU).
    """
    if device not in (None, "cpu", "cuda"):
        raise MemtoolError(f"unknown --device {device!r}: use cpu or cuda")
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise MemtoolError("--device cuda asked, but this machine has no CUDA device")
    backend = "nccl" if use_cuda else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owned = not dist.is_initialized()
    with contextlib.ExitStack() as stack:
        if owned and _launched():
            dist.init_process_group(backend, timeout=_TIMEOUT)
        elif owned:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="memtool-pg-")))
            store = dist.FileStore(str(folder / "store"), 1)
            dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=_TIMEOUT)
        if use_cuda:
            torch.cuda.set_device(local_rank)
            where = torch.device("cuda", local_rank)
        else:
            where = torch.device("cpu")
        try:
            yield Dist(dist.get_rank(), dist.get_world_size(), local_rank, where)
        finally:
            if owned:
                dist.destroy_process_group()
