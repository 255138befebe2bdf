"""Atomic writes and a cross-process lock, so interrupted or concurrent runs never leave a
half-written file or directory where a complete one is expected.

Pattern: write into a temporary sibling (same filesystem), fsync, then `os.replace`/`os.rename`.
A crash leaves only a `.tmp-*` sibling, which is removed on the next attempt.
"""

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_file(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success it is fsynced and renamed to `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{dest.name}-", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o644 & ~_umask())  # mkstemp makes 0600; cache files are shareable
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    finally:
        _remove(tmp)


def replace_dir(tmp: Path, dest: Path) -> None:
    """Rename the finished directory `tmp` to `dest`, replacing a `dest` that exists only once
    `tmp` is complete: an earlier version is moved aside, not deleted first, so an interrupt
    before this call leaves it as it was."""
    if dest.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-old-", dir=dest.parent))
        os.rename(dest, aside / dest.name)
        os.rename(tmp, dest)
        _remove(aside)
    else:
        os.rename(tmp, dest)


@contextlib.contextmanager
def atomic_dir(dest: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `dest`; on success it is renamed to `dest`.

    Without `replace`, `dest` must not exist when the block ends (the caller holds a lock or
    checks first); with it, an existing `dest` is replaced once the new one is complete. Any
    failure or interrupt removes the temporary directory, so `dest` is either as it was or
    complete.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755 & ~_umask())  # mkdtemp makes 0700
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb") as handle:
                    os.fsync(handle.fileno())
        if replace:
            replace_dir(tmp, dest)
        else:
            os.rename(tmp, dest)
        _fsync_dir(dest.parent)
    finally:
        _remove(tmp)


def clean_stale_temporaries(directory: Path, name: str) -> None:
    """Remove `.tmp-NAME-*` leftovers of interrupted runs (call while holding NAME's lock)."""
    if directory.is_dir():
        for leftover in directory.glob(f".tmp-{name}-*"):
            _remove(leftover)


@contextlib.contextmanager
def file_lock(lock_path: Path) -> Iterator[None]:
    """Exclusive advisory lock held for the block; waits for other processes holding it."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
