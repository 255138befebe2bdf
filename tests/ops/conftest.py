"""Kernel tests: Triton kernels run in the interpreter, on CPU tensors, in a fresh process.

Why a subprocess: triton reads TRITON_INTERPRET when it is first imported (its standard library,
`tl.zeros` included, is `@triton.jit`-decorated then), and by the time this directory is
collected other memtool imports (bitsandbytes, transformers) have usually imported triton
already. A child process that sets the variable before any import is the only reliable way.
"""

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("interpret_worker.py")


@pytest.fixture(scope="session")
def run_interpreted(tmp_path_factory) -> Callable[[list[dict]], list[dict]]:
    """Run jobs through `memtool.ops` under TRITON_INTERPRET=1 in a child process.

    A job is `{"kwargs": {...the op's arguments...}, "backend": "triton" | "auto", "op": name}`,
    where `op` is `"gptq_linear"` (the default when absent), `"triton_gptq_linear"` (the Triton
    entry point, taking `path` and `tiles` as a tuple), `"triton_dequantize_gptq"`,
    `"bitstack_linear"`, `"triton_bitstack_linear"` (taking `path`), `"pack_activation"`,
    `"unpack_activation"` (its `packed` given as a dict of `Packed`'s fields), `"adamw_step"` or
    `"feedback_signs"` (BitStack's sign feedback with `loop="triton"`: signs and row errors);
    each result is `{"out": ..., "backend": str}` or `{"error": str}` (a `MemtoolError` message).
    `out` is the op's tensor, a `Packed` as a dict of its fields, or for `adamw_step` the
    updated buffers by argument name (see interpret_worker.py). Skips when triton is not
    installed.
    """
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")

    def run(jobs: list[dict]) -> list[dict]:
        folder = tmp_path_factory.mktemp("interpret")
        torch.save(jobs, folder / "jobs.pt")
        repo = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
        done = subprocess.run(
            [sys.executable, str(WORKER), str(folder / "jobs.pt"), str(folder / "out.pt")],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            pytest.fail(f"interpreter worker failed:\n{done.stderr[-4000:]}")
        return torch.load(folder / "out.pt")

    return run


@pytest.fixture(scope="module")
def kernel() -> None:
    """Build (or load) the native CPU kernels once; skip only where no build tool is installed."""
    from memtool.ops.cpu import cpu_kernel_status

    usable, reason = cpu_kernel_status()
    if not usable:
        if reason.startswith(("no C++ compiler", "ninja is not installed")):
            pytest.skip(reason)
        pytest.fail(f"the CPU kernel did not build: {reason}")
