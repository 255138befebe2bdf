"""Which BitStack statistic carries the calibration's domain: the scales, the feedback Hessians or
the ordering's Fisher?

The statistics pass is run once per calibration (64 x 512 windows of `wiki`, `mixed` or `code`,
seed 0; Hessians and Fisher from the first 16 windows, for `mixed` 8 wiki + 8 code) and saved;
each variant then compresses the default stack with its statistics taken from different
calibrations, through the pipeline's `collect_stats` seam. A variant is three letters: the
source of the scales, of the feedback Hessians, of the Fisher (W wiki, M mixed, C code); the
Hessian letter may also be 2 (half wiki, half mixed: a quarter code) or 3 (a quarter wiki,
three quarters mixed: three eighths code). WWW is the default stack, MMM `--calib mixed`, MWW
`--calib mixed --score-calib wiki`. Evaluated on the windows of `bitstack_curve.py` (16 wiki,
8 code).

Usage: python benchmarks/bitstack_stat_sources.py --work /tmp/hyb \
    --variants WWW,WWM,WMW,MWW,MMM,M2W,M3W,C2W,CWW --budgets-mb 104,110,120
"""

import argparse
import json
import time
from pathlib import Path
from unittest import mock

import torch

import memtool.compress.bitstack_pipeline as pipeline
from memtool import load_model
from memtool.compress import BitStackConfig, CalibrationConfig, compress
from memtool.compress.bitstack_scaling import LinearStats, collect_stats
from memtool.data import calibration_windows, evaluation_windows
from memtool.metrics import perplexity

SOURCES = {"W": "wiki", "M": "mixed", "C": "code"}
MIXED_SHARE = {"2": 0.5, "3": 0.75}  # share of the mixed Hessian, the rest wiki's


def _statistics(work: Path, key: str) -> tuple[dict, dict]:
    path = work / f"stats_{key}.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    loaded = load_model(None)
    windows = calibration_windows(SOURCES[key], loaded.tokenizer, n_samples=64, seq_len=512)
    began = time.perf_counter()
    stats = collect_stats(loaded.model, windows.input_ids, 8, 16, False, torch.bfloat16)
    print(f"statistics {SOURCES[key]}: {time.perf_counter() - began:.0f} s", flush=True)
    torch.save(stats, path)
    return stats


def _hessian(sources: dict, key: str, name: str) -> torch.Tensor:
    if key in MIXED_SHARE:
        share = MIXED_SHARE[key]
        return (1 - share) * sources["W"][0][name].hessian + share * sources["M"][0][name].hessian
    return sources[key][0][name].hessian.clone()


def _hybrid(sources: dict, variant: str) -> tuple[dict, dict]:
    """Statistics for `variant`, keeping the sharing of entries between linears that read
    one input (the pipeline computes one feedback factor per shared entry)."""
    scale_key, hessian_key, fisher_key = variant
    stats, made = {}, {}
    for name, entry in sources[scale_key][0].items():
        if id(entry) not in made:
            hessian = _hessian(sources, hessian_key, name)
            made[id(entry)] = LinearStats(entry.scale_sum.clone(), entry.windows, hessian, 1)
        stats[name] = made[id(entry)]
    fisher = {name: values.clone() for name, values in sources[fisher_key][1].items()}
    return stats, fisher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--variants", default="WWW,WWM,WMW,MWW,MMM")
    parser.add_argument("--budgets-mb", default="104,110,120")
    args = parser.parse_args()
    torch.set_num_threads(2)
    args.work.mkdir(parents=True, exist_ok=True)
    results_path = args.work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    variants = args.variants.split(",")
    needed = {letter for v in variants for letter in v if letter in SOURCES}
    if any(v[1] in MIXED_SHARE for v in variants):
        needed |= {"W", "M"}
    sources = {key: _statistics(args.work, key) for key in sorted(needed)}
    tokenizer = load_model(None).tokenizer
    evals = {
        "wiki": evaluation_windows("wiki", tokenizer, seq_len=512, max_windows=16),
        "code": evaluation_windows("code", tokenizer, seq_len=512, max_windows=8),
    }
    budgets = [int(float(mb) * 10**6) for mb in args.budgets_mb.split(",")]
    for variant in variants:
        entry = results.setdefault(variant, {})
        folder = args.work / variant
        if not (folder / "bitstack.json").exists():
            with mock.patch.object(
                pipeline, "collect_stats", lambda *a, v=variant, **k: _hybrid(sources, v)
            ):
                compress(
                    None,
                    BitStackConfig(),
                    CalibrationConfig(data="wiki", n_samples=64, seq_len=512),
                    output=folder,
                    overwrite=True,
                    show_progress=False,
                )
        loaded = load_model(folder)
        for budget in budgets:
            if str(budget) not in entry:
                loaded.set_budget(budget)
                entry[str(budget)] = [
                    perplexity(loaded.model, w.input_ids, 4, show_progress=False).perplexity
                    for w in evals.values()
                ]
                results_path.write_text(json.dumps(results, indent=1))
            wiki, code = entry[str(budget)]
            print(f"{variant} {budget / 1e6:g} MB: wiki {wiki:.2f} code {code:.2f}", flush=True)
        del loaded


if __name__ == "__main__":
    main()
