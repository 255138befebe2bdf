"""BitStack linears on CPU at decode sizes: the native LUT kernel vs the reference, per row count.

Times one `bitstack_linear` call per (layer shape, rows of x) on random layers of smollm2-135m's
linear shapes (`out x in`, rank as BitStack's auto rank picks for them), with fp16 factors and
16 blocks: the native kernel (`memtool.ops.cpu.cpu_bitstack_linear`) against the reference
(`memtool.ops.reference.bitstack_linear`, which reconstructs the dense weight and calls BLAS).
Best-of-N milliseconds per call; these are the numbers behind `CPU_MAX_ROWS_BITSTACK`. Both
paths run on `--threads` threads (torch's pool, which the kernel's at::parallel_for and BLAS
follow; set OMP_NUM_THREADS to the same for good measure).

    OMP_NUM_THREADS=1 python benchmarks/cpu_bitstack_decode.py [--rows 1,2,4,8,16,32,64]
        [--repeats 5] [--blocks 16] [--threads 1] [--json out.json]
"""

import argparse
import functools
import json
import time

import torch

from memtool.formats.synthetic import random_bitstack_layer
from memtool.ops.cpu import CPU_MAX_ROWS_BITSTACK, cpu_bitstack_linear, cpu_kernel_status
from memtool.ops.reference import bitstack_linear as reference_linear

# (out_features, in_features, rank): q/o projections, k/v, gate/up, down.
SHAPES = ((576, 576, 4), (192, 576, 2), (1536, 576, 7), (576, 1536, 7))


def make_layer(out_features: int, in_features: int, rank: int, blocks: int) -> tuple:
    gen = torch.Generator().manual_seed(out_features * 7 + in_features + rank)
    return random_bitstack_layer(out_features, in_features, rank, blocks, gen, decay=False).args()


def best_ms(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, first-use paths
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - began)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,4,8,16,32,64")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # the kernel's at::parallel_for follows it too
    usable, reason = cpu_kernel_status()
    if not usable:
        raise SystemExit(f"the native CPU kernel is unavailable: {reason}")
    rows_list = [int(r) for r in args.rows.split(",")]

    results = []
    with torch.inference_mode():
        for out_features, in_features, rank in SHAPES:
            layer = make_layer(out_features, in_features, rank, args.blocks)
            for rows in rows_list:
                x = torch.randn(rows, in_features)
                kernel = best_ms(functools.partial(cpu_bitstack_linear, x, *layer), args.repeats)
                ref = best_ms(functools.partial(reference_linear, x, *layer), args.repeats)
                results.append(
                    {
                        "shape": f"{out_features}x{in_features}",
                        "rank": rank,
                        "rows": rows,
                        "kernel_ms": round(kernel, 3),
                        "reference_ms": round(ref, 3),
                    }
                )
                print(
                    f"{out_features:>5}x{in_features:<5} r{rank} rows {rows:>3}: "
                    f"kernel {kernel:8.3f} ms  reference {ref:8.3f} ms  ({ref / kernel:5.1f}x)",
                    flush=True,
                )
    summary = {
        "blocks": args.blocks,
        "threads": args.threads,
        "repeats": args.repeats,
        "cpu_max_rows_bitstack": CPU_MAX_ROWS_BITSTACK,
        "results": results,
    }
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(summary, handle, indent=2)


if __name__ == "__main__":
    main()
