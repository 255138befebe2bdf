"""BitStack on smollm2-135m under other calibrations: wiki and code perplexity at a few budgets.

Each variant is the default stack (`BitStackConfig()`) compressed from its own calibration
windows; `--variants` names them as `DATA:SAMPLES[:SCORE[:SCORE_DATA]]` (a built-in set or
data spec, the number of calibration windows of 512 tokens, optionally the score windows that
drive the importance estimate and the sign feedback, and the data they are drawn from when not
the calibration's: `mixed:64::wiki` is `--calib mixed --score-calib wiki`; an empty SCORE keeps
the default count), with `+tw` appended for `--token-weighting` and `+ow0` for
`--output-weighting 0` (`mixed:64+tw`). Evaluated on the same windows as
`bitstack_curve.py` (16 wiki, 8 code evaluation windows), next to per-channel 4-bit RTN, the
size the issue's "below per-channel RTN at 4-bit sizes" refers to.

Usage: python benchmarks/bitstack_calibration.py --work /tmp/bsx \
    --variants wiki:64,mixed:64,mixed:128:32,mixed:64::wiki,mixed:64+tw --budgets-mb 104,110,120
"""

import argparse
import time
from pathlib import Path

import torch
from resumable import open_results

from memtool import load_model
from memtool.compress import BitStackConfig, CalibrationConfig, RTNConfig, compress
from memtool.data import evaluation_windows
from memtool.metrics import perplexity
from memtool.metrics.sizes import weight_bytes


def _ppl(model, ids, batch_size: int) -> float:
    return perplexity(model, ids, batch_size, show_progress=False).perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--variants", default="wiki:64,mixed:64")
    parser.add_argument("--budgets-mb", default="104,110,120")
    parser.add_argument("--windows", type=int, default=16, help="wiki evaluation windows")
    parser.add_argument("--code-windows", type=int, default=8, help="code evaluation windows")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(2)
    results, save = open_results(args.work)

    dense = load_model(None)
    wiki = evaluation_windows("wiki", dense.tokenizer, seq_len=512, max_windows=args.windows)
    code = evaluation_windows("code", dense.tokenizer, seq_len=512, max_windows=args.code_windows)
    del dense
    if "rtn 4-bit per-channel sym" not in results:
        _, _, fake = compress(None, RTNConfig(4, -1, True), show_progress=False)
        results["rtn 4-bit per-channel sym"] = {
            "wiki": _ppl(fake.model, wiki.input_ids, args.batch_size),
            "code": _ppl(fake.model, code.input_ids, args.batch_size),
        }
        del fake
        save()
    print("rtn 4-bit per-channel sym", results["rtn 4-bit per-channel sym"], flush=True)
    budgets = [int(float(mb) * 10**6) for mb in args.budgets_mb.split(",")]
    for variant in args.variants.split(","):
        spec, *flags = variant.split("+")
        unknown = set(flags) - {"tw", "ow0"}
        if unknown:
            raise SystemExit(f"unknown variant flags {sorted(unknown)} in {variant!r}")
        data, samples, *rest = spec.split(":")
        score = int(rest[0]) if rest and rest[0] else None
        score_data = rest[1] if len(rest) > 1 else None
        entry = results.setdefault(variant, {})
        folder = args.work / variant.replace(":", "_").replace("+", "-")
        if "compress_seconds" not in entry:
            began = time.perf_counter()
            compress(
                None,
                BitStackConfig(
                    score_samples=score,
                    score_data=score_data,
                    token_weighting="tw" in flags,
                    output_weighting=0.0 if "ow0" in flags else 1.0,
                ),
                CalibrationConfig(data=data, n_samples=int(samples), seq_len=512),
                output=folder,
                overwrite=True,
                show_progress=False,
            )
            entry["compress_seconds"] = time.perf_counter() - began
            save()
        loaded = load_model(folder)
        points = entry.setdefault("points", {})
        for budget in budgets:
            if str(budget) in points:
                continue
            loaded.set_budget(budget)
            points[str(budget)] = {
                "bytes": weight_bytes(loaded.model),
                "wiki": _ppl(loaded.model, wiki.input_ids, args.batch_size),
                "code": _ppl(loaded.model, code.input_ids, args.batch_size),
            }
            save()
            print(variant, budget, points[str(budget)], flush=True)
        del loaded
    rows = ["| variant | " + " | ".join(f"{b / 1e6:g} MB wiki / code" for b in budgets) + " |"]
    rows.append("| --- |" + " --- |" * len(budgets))
    for variant in args.variants.split(","):
        points = results[variant]["points"]
        cells = [f"{points[str(b)]['wiki']:.1f} / {points[str(b)]['code']:.1f}" for b in budgets]
        rows.append(f"| {variant} | " + " | ".join(cells) + " |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
