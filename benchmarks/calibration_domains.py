"""Calibration domain x evaluation domain for GPTQ at 4, 3 and 2 bits (issue 4's table).

smollm2-135m, GPTQ group 128 symmetric with act-order, calibrated on `wiki`, `code` or `mixed`
(--samples x 512 tokens, seed 0), evaluated on the `wiki` evaluation split and on `code`
(--windows x 512 each); round-to-nearest at the same bits/group/symmetry as the floor to beat.
Results accumulate in --work/results.json (a rerun skips what is there) and print as a table.

Usage: python benchmarks/calibration_domains.py --work /tmp/domains [--samples 128]
    [--mixed-samples N]   (also calibrate `mixed` on N windows: N/2 from each domain)
"""

import argparse
import json
import time
from pathlib import Path

import torch

from memtool import load_model
from memtool.compress import CalibrationConfig, GPTQConfig, RTNConfig, compress
from memtool.data import evaluation_windows
from memtool.metrics import perplexity

BITS = (4, 3, 2)
CALIBRATIONS = ("wiki", "code", "mixed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--bits", default="4,3,2")
    parser.add_argument("--calibrations", default=",".join(CALIBRATIONS))
    parser.add_argument(
        "--mixed-samples",
        type=int,
        help="also calibrate mixed on this many windows (twice --samples gives each domain as "
        "many windows as its matched set)",
    )
    parser.add_argument(
        "--static-groups",
        action="store_true",
        help="GPTQ act-order groups fitted on the original column order (the default before "
        "2026-11-28; the table in BENCHMARKS.md's first runs)",
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    args.work.mkdir(parents=True, exist_ok=True)
    path = args.work / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    tokenizer = load_model(None).tokenizer
    evals = {
        name: evaluation_windows(name, tokenizer, seq_len=512, max_windows=args.windows)
        for name in ("wiki", "code")
    }

    def evaluate(model) -> dict:
        return {
            name: perplexity(model, w.input_ids, 4, show_progress=False).perplexity
            for name, w in evals.items()
        }

    if "fp32" not in results:
        results["fp32"] = evaluate(load_model(None).model)
        path.write_text(json.dumps(results, indent=1))
    for bits in (int(b) for b in args.bits.split(",")):
        key = f"{bits}-bit RTN"
        if key not in results:
            _, _, fake = compress(None, RTNConfig(bits, 128, True), show_progress=False)
            results[key] = evaluate(fake.model)
            path.write_text(json.dumps(results, indent=1))
        print(key, results[key], flush=True)
        runs = [(calib, args.samples, "") for calib in args.calibrations.split(",")]
        if args.mixed_samples:
            runs.append(("mixed", args.mixed_samples, f" ({args.mixed_samples} samples)"))
        for calib, samples, suffix in runs:
            config = GPTQConfig(bits, 128, True, static_groups=args.static_groups)
            groups = ", static groups" if args.static_groups else ""
            # True sequential is the default at 3 bits and below since 2026-11-29; earlier
            # rows (no suffix) were calibrated in one pass.
            groups += ", true sequential" if config.true_sequential else ""
            key = f"{bits}-bit GPTQ, {calib} calibration{suffix}{groups}"
            if key in results:
                print(key, results[key], flush=True)
                continue
            began = time.perf_counter()
            _, _, fake = compress(
                None,
                config,
                CalibrationConfig(data=calib, n_samples=samples, seq_len=512),
                show_progress=False,
            )
            seconds = time.perf_counter() - began
            results[key] = {**evaluate(fake.model), "seconds": seconds}
            path.write_text(json.dumps(results, indent=1))
            print(key, results[key], flush=True)
    _table(results)


def _table(results: dict) -> None:
    print("\n| model | wiki ppl | code ppl |\n|---|---|---|")
    for key, value in results.items():
        print(f"| {key} | {value['wiki']:.2f} | {value['code']:.2f} |")


if __name__ == "__main__":
    main()
