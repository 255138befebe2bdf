"""BitStack decomposition time: the official procedure against memtool's, side by side.

The official code decomposes each scaled linear with one full SVD of `|R|` per block in float32
and subtracts the unrounded factors (`decompose_weight` in its `BitStackLinear`). memtool runs
that same procedure with `BitStackConfig(exact_svd=True, residual="fp32")`, rank 4 and no sign
feedback, so the two decompositions differ only in what memtool does differently: randomized
SVD (4 power iterations), the fp16 residual, ranks per shape, output weighting, and sign
feedback (the default) or sign(R) (`--no-feedback`). Each compression runs in its own child
process, the variants alternating for `--rounds` rounds, on smollm2-135m with 64 x 512 `wiki`
calibration windows; times are the compressions' own phases.

Usage: python benchmarks/bitstack_decompose_speed.py --work /tmp/bs-speed [--rounds 2]
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

VARIANTS = {
    "official procedure": "rank=4, feedback=False, exact_svd=True, residual='fp32', "
    "order='uniform', score_samples=8, output_weighting=0",
    "memtool default": "",
    "memtool --no-feedback": "feedback=False, score_samples=8",
}

_CHILD = """
import json, sys, time, torch
from memtool.compress import BitStackConfig, CalibrationConfig, compress
torch.set_num_threads(2)
began = time.perf_counter()
summary, _, _ = compress(None, eval("BitStackConfig(" + sys.argv[1] + ")"),
    CalibrationConfig(n_samples=64, seq_len=512), output=sys.argv[2], overwrite=True,
    show_progress=False)
print(json.dumps({"seconds": time.perf_counter() - began, "phase_seconds": summary.phase_seconds}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            out = subprocess.run(
                [sys.executable, "-c", _CHILD, VARIANTS[name], str(args.work / "stack")],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
            (args.work / "results.json").write_text(json.dumps(runs, indent=1))
            print(name, runs[name][-1], flush=True)
    print("\n| variant | decomposition | statistics | whole call |")
    print("| --- | --- | --- | --- |")
    for name, items in runs.items():
        cells = [
            " / ".join(f"{run['phase_seconds'][phase]:.1f}" for run in items)
            for phase in ("decompose", "statistics")
        ]
        whole = " / ".join(f"{run['seconds']:.1f}" for run in items)
        print(f"| {name} | {cells[0]} s | {cells[1]} s | {whole} s |")


if __name__ == "__main__":
    main()
