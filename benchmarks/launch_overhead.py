"""Host time memtool adds to each GPTQ/BitStack Triton call: checks, path choice, grid
arithmetic and allocation, with the kernel launches themselves replaced by no-ops.

Decode on a GPU is launch-bound (BENCHMARKS.md, "GPU kernels": ~40 us per call on an H200
machine, where a 4096 x 4096 4-bit layer's kernel needs a few), so this host work matters. It
runs on CPU tensors under TRITON_INTERPRET=1 (set here, before triton is imported), which
passes the same checks a CUDA call does; Triton's own launch cost is not included.

    python benchmarks/launch_overhead.py [--calls 2000]
"""

import argparse
import os
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from gpu_linear_kernels import bitstack_args, bitstack_layer, gptq_args, gptq_layer  # noqa: E402

import memtool.ops as ops  # noqa: E402
import memtool.ops.triton.bitstack_matmul as bitstack_module  # noqa: E402
import memtool.ops.triton.gptq_matmul as gptq_module  # noqa: E402


class _NoLaunch:
    """Stands in for a jitted kernel: `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def per_call_us(fn, calls: int) -> float:
    for _ in range(100):
        fn()
    began = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - began) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for module, names in ((gptq_module, ("_gptq_gemv_kernel", "_gptq_dequant_kernel")),
                          (bitstack_module, ("_bitstack_matmul_kernel",
                                             "_bitstack_reconstruct_kernel"))):  # fmt: skip
        for name in names:
            setattr(module, name, _NoLaunch())
    cpu, gen = torch.device("cpu"), torch.Generator().manual_seed(0)
    gptq = gptq_args(gptq_layer(4, 4096, 4096, 128, False, gen, cpu), 4, 4096)
    bitstack = bitstack_args(bitstack_layer(4096, 4096, 16, 4, torch.float16, gen, cpu), 4096)
    x = torch.randn(1, 4096)
    rows = [
        ("memtool.ops.gptq_linear (dispatch + wrapper)",
         lambda: ops.gptq_linear(x, *gptq, backend="triton")),
        ("triton_gptq_linear (wrapper)", lambda: gptq_module.triton_gptq_linear(x, *gptq)),
        ("memtool.ops.bitstack_linear (dispatch + wrapper)",
         lambda: ops.bitstack_linear(x, *bitstack, backend="triton")),
        ("triton_bitstack_linear (wrapper)",
         lambda: bitstack_module.triton_bitstack_linear(x, *bitstack)),
    ]  # fmt: skip
    print("| one row, 4096 x 4096, launches stubbed | host us per call |")
    print("|---|---|")
    for label, fn in rows:
        print(f"| {label} | {per_call_us(fn, args.calls):.1f} |")


if __name__ == "__main__":
    main()
