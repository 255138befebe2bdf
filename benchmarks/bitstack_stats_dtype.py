"""BitStack's statistics pass in float32 against bfloat16 autocast: time and quality.

The default stack of smollm2-135m (64 x 512 `wiki` calibration windows, seed 0) compressed
once per `--stats-dtype`, each in its own child process one after the other (`--rounds` times,
alternating), then both stacks measured at the same budgets on the same evaluation windows.
Times are the compression's own phases (`phase_seconds`) and the whole call's wall time.
bfloat16 is only faster where the CPU has native bfloat16 matmuls (AVX512-BF16 or AMX).

Usage: python benchmarks/bitstack_stats_dtype.py --work /tmp/bs-dtype [--rounds 1] [--no-eval]
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from memtool import load_model
from memtool.data import evaluation_windows
from memtool.metrics import perplexity
from memtool.metrics.sizes import weight_bytes

DTYPES = ("float32", "bfloat16")
BUDGETS_MB = (88, 104, 120, 151, 182)

_CHILD = """
import json, sys, time, torch
from memtool.compress import BitStackConfig, CalibrationConfig, compress
torch.set_num_threads(2)
began = time.perf_counter()
summary, _, _ = compress(None, BitStackConfig(stats_dtype=sys.argv[1]),
    CalibrationConfig(n_samples=64, seq_len=512), output=sys.argv[2], overwrite=True,
    show_progress=False)
print(json.dumps({"seconds": time.perf_counter() - began, "phase_seconds": summary.phase_seconds,
    "statistics_dtype": summary.details["statistics_dtype"]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=1, help="compressions per dtype")
    parser.add_argument("--windows", type=int, default=16, help="wiki evaluation windows")
    parser.add_argument("--code-windows", type=int, default=8)
    parser.add_argument("--no-eval", action="store_true", help="time the compressions only")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict = {"runs": {d: [] for d in DTYPES}, "points": {d: {} for d in DTYPES}}
    path = args.work / "results.json"
    for round_ in range(args.rounds):
        for dtype in DTYPES if round_ % 2 == 0 else DTYPES[::-1]:
            out = subprocess.run(
                [sys.executable, "-c", _CHILD, dtype, str(args.work / dtype)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            run = json.loads(out.strip().splitlines()[-1])
            results["runs"][dtype].append(run)
            path.write_text(json.dumps(results, indent=1))
            print(dtype, run, flush=True)

    for dtype in DTYPES:
        stats = [r["phase_seconds"]["statistics"] for r in results["runs"][dtype]]
        total = [r["seconds"] for r in results["runs"][dtype]]
        print(f"{dtype}: statistics {min(stats):.1f} s, whole call {min(total):.1f} s (best)")
    if args.no_eval:
        return
    torch.set_num_threads(2)
    tokenizer = load_model(None).tokenizer
    evals = {
        "wiki": evaluation_windows("wiki", tokenizer, seq_len=512, max_windows=args.windows),
        "code": evaluation_windows("code", tokenizer, seq_len=512, max_windows=args.code_windows),
    }
    for dtype in DTYPES:
        loaded = load_model(args.work / dtype)
        for mb in BUDGETS_MB:
            began = time.perf_counter()
            loaded.set_budget(mb * 10**6)
            point = {"bytes": weight_bytes(loaded.model)}
            for name, windows in evals.items():
                point[name] = perplexity(loaded.model, windows.input_ids, 4, show_progress=False)
                point[name] = point[name].perplexity
            results["points"][dtype][str(mb)] = point
            path.write_text(json.dumps(results, indent=1))
            print(dtype, mb, point, f"{time.perf_counter() - began:.0f} s", flush=True)
    print("\n| MB | " + " | ".join(f"{d} wiki | {d} code" for d in DTYPES) + " |")
    for mb in BUDGETS_MB:
        points = [results["points"][d][str(mb)] for d in DTYPES]
        cells = [f"{p['wiki']:.2f} | {p['code']:.2f}" for p in points]
        print(f"| {mb} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
