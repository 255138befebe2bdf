"""GPTQ's peak memory with and without mapped large allocations, side by side.

`quantize_sequential` runs its pass inside `large_allocations_mapped()` (glibc serves blocks of
1 MiB or more from their own mappings, so a freed one leaves the resident set at once). This
runs the same GPTQ job (default model, saved calibration windows, the checkpoint written) in
child processes, alternating the pass as shipped with the pass under glibc's own behaviour
(`MALLOC_MMAP_THRESHOLD_` pinned at 32 MiB, the top of its dynamic range, which also turns the
context off), and prints each run's wall time and peak RSS as JSON.

Usage: python benchmarks/gptq_peak_memory.py [--samples 32] [--bits 4] [--repeats 2]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from memtool import load_model
from memtool.data import calibration_windows

CHILD = Path(__file__).parent / "_children" / "memtool_gptq.py"
MODES = {"mapped (shipped)": {}, "glibc default": {"MALLOC_MMAP_THRESHOLD_": str(32 << 20)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--env-thresholds-mib",
        default="",
        help="also run with MALLOC_MMAP_THRESHOLD_ at each of these sizes (whole process)",
    )
    args = parser.parse_args()
    modes = dict(MODES)
    for mib in filter(None, args.env_thresholds_mib.split(",")):
        modes[f"env threshold {mib} MiB"] = {"MALLOC_MMAP_THRESHOLD_": str(int(mib) << 20)}
    work = Path(tempfile.mkdtemp(prefix="gptq-memory-"))
    tokenizer = load_model("smollm2-135m").tokenizer
    windows = calibration_windows("wiki", tokenizer, args.samples, args.seq_len, seed=0)
    torch.save(windows.input_ids, work / "calibration.pt")
    runs = []
    for repeat in range(args.repeats):
        for mode, env in modes.items():
            out = work / f"out-{repeat}-{len(runs)}"
            child_args = [str(out), str(work / "calibration.pt"), str(args.bits), "128", "0.01"]
            done = subprocess.run(
                [sys.executable, str(CHILD), *child_args],
                capture_output=True,
                text=True,
                env={**os.environ, **env},
            )
            if done.returncode != 0:
                sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
            row = {"mode": mode, **json.loads(done.stdout.strip().splitlines()[-1])}
            runs.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for mode in modes:
        rows = [r for r in runs if r["mode"] == mode]
        summary[mode] = {
            "peak_rss_mb": [round(r["peak_rss_bytes"] / 2**20) for r in rows],
            "seconds": [r["seconds"] for r in rows],
        }
    print(json.dumps({"settings": vars(args), "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
