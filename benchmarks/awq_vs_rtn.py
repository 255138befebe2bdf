"""AWQ against round-to-nearest on smollm2-135m at the same bits, group and symmetry.

Issue 4's target: AWQ 4-bit and 3-bit below RTN at the same bits and group. Both run through
`memtool.compress` on the same model and are evaluated on the same windows in this one run;
AWQ's time (its grid searches dominate) is recorded beside its perplexity.

Usage: python benchmarks/awq_vs_rtn.py --bits 3 [--calib-samples 32] [--windows 16]
    [--stats-dtypes float32,bfloat16]  (one AWQ row per forward dtype; default: auto)
Writes benchmarks/results/awq_vs_rtn_<bits>bit.json.
"""

import argparse
import json
import time
from pathlib import Path

from memtool import load_model
from memtool.compress import AWQConfig, CalibrationConfig, RTNConfig, compress
from memtool.data import evaluation_windows
from memtool.metrics import perplexity

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--sym", action="store_true", help="symmetric groups (default: asym)")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--stats-dtypes", default="auto", help="AWQ forward dtypes, comma list")
    args = parser.parse_args()
    calibration = CalibrationConfig(data="wiki", n_samples=args.calib_samples)
    shape = dict(bits=args.bits, group_size=args.group_size, sym=args.sym)
    results = {"settings": {**shape, "calib_samples": args.calib_samples}, "rows": []}
    tokenizer = load_model(None).tokenizer
    windows = {
        data: evaluation_windows(data, tokenizer, 512, args.windows).input_ids
        for data in ("wiki", "code")
    }
    runs = [("rtn", RTNConfig(**shape))]
    runs += [("awq", AWQConfig(**shape, stats_dtype=d)) for d in args.stats_dtypes.split(",")]
    for name, config in runs:
        loaded = load_model(None)
        began = time.perf_counter()
        result, _, quantized = compress(
            loaded, config, calibration if name == "awq" else None, show_progress=False
        )
        seconds = time.perf_counter() - began
        row = {"method": name, "seconds": round(seconds, 1), "phases": result.phase_seconds}
        if name == "awq":
            row["stats_dtype"] = result.settings["stats_dtype"]
        for data, ids in windows.items():
            row[f"ppl_{data}"] = perplexity(quantized.model, ids, show_progress=False).perplexity
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    out = ROOT / "benchmarks" / "results" / f"awq_vs_rtn_{args.bits}bit.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
