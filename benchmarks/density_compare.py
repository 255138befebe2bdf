"""Issue 7's comparison target: six variants of the default model in one `memtool measure`.

fp (the base), GPTQ 4-bit and 3-bit (group 128) and one BitStack stack at three budgets,
measured with the default evaluation size (32 windows x 512 of `wiki`) against the shipped
ladder profile, with the Pareto plot and the Markdown summary. The variants are compressed into
--work first when missing (timed apart: compression is not part of the target). The comparison
runs as the CLI a user would type, and its wall time is the number checked against 10 minutes.

Usage: python benchmarks/density_compare.py --work /tmp/density-compare
Writes benchmarks/results/density_compare.json (and the summary and plot into --work).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "recipes" / "wiki-ladder-profile.json"
BUDGETS = "85MB,100MB,130MB"  # about 2, 3.3 and 5.5 bits per linear weight
VARIANTS = {
    "q4": ["--method", "gptq", "--bits", "4", "--group-size", "128"],
    "q3": ["--method", "gptq", "--bits", "3", "--group-size", "128"],
    "stack": ["--method", "bitstack"],
}


def _memtool(*args: str) -> list[str]:
    return [sys.executable, "-m", "memtool", *args]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--profile", type=Path, default=PROFILE)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    compress_s = {}
    for name, flags in VARIANTS.items():
        out = args.work / name
        if out.exists():
            continue
        began = time.perf_counter()
        subprocess.run(_memtool("compress", *flags, "-o", str(out)), check=True)
        compress_s[name] = round(time.perf_counter() - began, 1)
    summary, plot = args.work / "summary.md", args.work / "pareto.png"
    command = _memtool(
        "measure", "smollm2-135m", *(str(args.work / name) for name in VARIANTS),
        "--budgets", BUDGETS, "--density-profile", str(args.profile),
        "--summary", str(summary), "--plot", str(plot), "--json",
    )  # fmt: skip
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall_s = time.perf_counter() - began
    if done.returncode != 0:
        sys.exit(f"the comparison failed ({done.returncode}): {done.stderr[-2000:]}")
    payload = json.loads(done.stdout)
    keep = (
        "label", "weight_bytes", "bits_per_weight_linear", "perplexity", "tokens_per_s",
        "effective_params", "effective_params_bound", "capacity_density",
        "capacity_density_interval", "effective_params_ratio",
        "effective_params_change_bound", "density_flags", "pareto",
    )  # fmt: skip
    rows = [{key: row[key] for key in keep} for row in payload["rows"]]
    result = {
        "command": " ".join(["memtool", *command[3:]]),
        "comparison_wall_s": round(wall_s, 1),
        "target_s": 600,
        "compress_s": compress_s,
        "windows": payload["reports"][0]["windows"],
        "seq_len": payload["reports"][0]["seq_len"],
        "rows": rows,
    }
    out = ROOT / "benchmarks" / "results" / "density_compare.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(summary.read_text())
    print(f"comparison of {len(rows)} rows: {wall_s:.0f} s (target 600 s); {out}")


if __name__ == "__main__":
    main()
