"""Compiling the native CPU kernels on first use, once per process, into memtool's cache.

One extension holds every kernel (`SOURCES`: GPTQ's `gptq_gemm.cpp`, BitStack's
`bitstack_gemv.cpp`, the flash reader's batched `pread_spans.cpp`, BitStack's compression-time
`sign_feedback.cpp`, the flash engine's one-token FFN `bundle_ffn.cpp`), registered as ops of one
TORCH_LIBRARY namespace. They are built with
`-march=native`, so a build is only valid on the machine (CPU features), torch and Python that
made it: all three name the build folder, which also lets a shared home directory serve several
machines. torch's `cpp_extension.load` rebuilds only when a source or the flags change and
serialises concurrent builds with a lock file, so a second process (or a later run) just loads
the library. That lock file outlives a build that was killed (Ctrl-C during the first compile),
and torch then waits for it forever; memtool therefore builds under an `flock` of its own, which
the kernel releases when a process dies, and clears torch's file while holding it.
"""

import contextlib
import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from memtool.paths import memtool_home

log = logging.getLogger("memtool.ops")

SOURCES = tuple(
    Path(__file__).with_name(name)
    for name in (
        "gptq_gemm.cpp",
        "bitstack_gemv.cpp",
        "pread_spans.cpp",
        "sign_feedback.cpp",
        "bundle_ffn.cpp",
    )
)
SOURCE = SOURCES[0]  # the GPTQ kernel, which holds the namespace's TORCH_LIBRARY block
LIBRARY = "memtool_cpu"  # the TORCH_LIBRARY namespace the sources register
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast"]


def _machine_tag() -> str:
    """A short tag for this CPU's instruction sets (what -march=native compiles for)."""
    flags = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        lines = cpuinfo.read_text(errors="replace").splitlines()
        flags += next((line for line in lines if line.startswith(("flags", "Features"))), "")
    return hashlib.sha256(flags.encode()).hexdigest()[:10]


def build_dir() -> Path:
    """Where this machine's build of the kernels lives.

    Named apart from the GPTQ-only build of earlier versions (`gptq_cpu-...`), whose library
    name and source list differ, so neither build is ever mistaken for the other; and by the
    folder the sources are in: torch rebuilds when a build folder's source paths change, so two
    installs sharing one folder (a checkout and a CI clone) rebuilt it in turn, ~60 s each.
    """
    torch_tag = torch.__version__.replace("+", "_")
    python_tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    sources_tag = hashlib.sha256(str(SOURCE.parent.resolve()).encode()).hexdigest()[:8]
    name = f"memtool_cpu-{torch_tag}-{python_tag}-{_machine_tag()}-{sources_tag}"
    return memtool_home() / "torch_extensions" / name


def _missing_tool() -> str | None:
    """Why the build cannot even start (no compiler, no ninja), or None."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} is not on PATH; install g++ or set CXX)"
    if shutil.which("ninja") is None:
        return "ninja is not installed (torch builds C++ extensions with it: pip install ninja)"
    return None


def _first_error_line(error: BaseException) -> str:
    """The compiler's first `error:` line, else the exception's first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = next((line for line in lines if "error:" in line), None)
    return detail or (lines[0] if lines else type(error).__name__)


def _with_venv_on_path() -> None:
    """Put the running Python's bin folder on PATH when ninja sits there but PATH lacks it.

    `pip install ninja` drops the binary beside `python`; torch looks it up on PATH only, which
    misses it whenever a virtualenv's python is run without activating the environment.
    """
    bin_dir = Path(sys.executable).parent
    if shutil.which("ninja") is None and (bin_dir / "ninja").exists():
        os.environ["PATH"] = os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")])


@contextlib.contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """Hold this build folder exclusively, clearing torch's lock file if a dead build left it.

    Every memtool process takes this `flock` before `cpp_extension.load`, so whoever holds it
    knows no other build is running here: a `lock` file found then is a killed build's.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock file is all there is
        yield
        return
    with open(folder / "memtool.flock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            stale = folder / "lock"
            if stale.exists():
                log.info("removing %s, left by a build that did not finish", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@functools.cache
def load_kernel() -> tuple[bool, str]:
    """Build (or load the cached build of) the kernels once per process.

    Returns:
        `(usable, reason)`: on success the ops are registered as `torch.ops.memtool_cpu.gptq_gemm`
        and `torch.ops.memtool_cpu.bitstack_gemv` and the reason names the build folder; on
        failure the reason is one line (a missing tool or the compiler's first error).
    """
    _with_venv_on_path()
    missing = _missing_tool()
    if missing:
        return False, missing
    from torch.utils import cpp_extension  # imported here: slow, and needed only now

    folder = build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    try:
        with _build_lock(folder):
            cpp_extension.load(
                name="memtool_cpu_kernels",
                sources=[str(source) for source in SOURCES],
                extra_cflags=_CFLAGS,
                extra_ldflags=["-fopenmp"],
                build_directory=str(folder),
                is_python_module=False,
                verbose=False,
            )
    # torch reports build failures as RuntimeError and a broken library as OSError; both mean
    # "not usable here", which the caller reports or turns into an error.
    except (RuntimeError, OSError, ImportError) as error:
        reason = f"building the CPU kernel failed: {_first_error_line(error)}"
        log.info("%s (after %.1f s)", reason, time.perf_counter() - began)
        return False, reason
    seconds = time.perf_counter() - began
    log.info("native CPU kernel built or loaded in %.1f s (%s)", seconds, folder)
    return True, f"compiled for this machine in {folder}"


__all__ = ["LIBRARY", "SOURCE", "SOURCES", "build_dir", "load_kernel"]
