"""Progress bars and console output on stderr, so stdout stays free for `--json`."""

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

console = Console(stderr=True)


def download_progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def step_progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=True,
    )


@contextlib.contextmanager
def counted_steps(
    description: str, total: int, show: bool = True
) -> Iterator[tuple[Progress, int]]:
    """A `step_progress` bar with one task of `total` steps: yields (progress, task id)."""
    with step_progress() as progress:
        yield progress, progress.add_task(description, total=total, status="", visible=show)
