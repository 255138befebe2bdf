"""Which BitStack statistic carries the calibration's domain: the scales, the feedback Hessians or
the ordering's Fisher?

The statistics pass is run once per calibration (64 x 512 windows of `wiki`, `mixed` or `code`,
seed 0; Hessians and Fisher from the first 16 windows, for `mixed` 8 wiki + 8 code) and saved;
each variant then compresses the default stack with its statistics taken from different
calibrations, through the pipeline's `collect_stats` seam. A variant is three letters: the
source of the scales, of the feedback Hessians, of the Fisher (W wiki, M mixed, C code); the
Hessian letter may also be 2 (half wiki, half mixed: a quarter code) or 3 (a quarter wiki,
three quarters mixed: three eighths code). The long form `S|H|F` also takes W64 / M64 (all 64
windows back-propagated, so Hessians and Fisher from all of them) and Hessian sums such as
`0.5*W64+0.5*M64`. WWW is the default stack, MMM `--calib mixed`, MWW
`--calib mixed --score-calib wiki`. Evaluated on the windows of `bitstack_curve.py` (16 wiki,
8 code).

Usage: python benchmarks/bitstack_stat_sources.py --work /tmp/hyb \
    --variants WWW,WWM,WMW,MWW,MMM,M2W,M3W,C2W,CWW --budgets-mb 104,110,120
"""

import argparse
import time
from pathlib import Path
from unittest import mock

import torch
from resumable import open_results

import memtool.compress.bitstack_pipeline as pipeline
from memtool import load_model
from memtool.compress import BitStackConfig, CalibrationConfig, compress
from memtool.compress.bitstack_scaling import LinearStats, collect_stats
from memtool.data import calibration_windows, evaluation_windows
from memtool.metrics import perplexity

SOURCES = {"W": "wiki", "M": "mixed", "C": "code"}
MIXED_SHARE = {"2": 0.5, "3": 0.75}  # share of the mixed Hessian, the rest wiki's


def _statistics(work: Path, key: str) -> tuple[dict, dict]:
    """Statistics of calibration `key` (W, M, C; with 64: every window back-propagated)."""
    path = work / f"stats_{key}.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    loaded = load_model(None)
    data = SOURCES[key[0]]
    windows = calibration_windows(data, loaded.tokenizer, n_samples=64, seq_len=512)
    scored = 64 if key.endswith("64") else 16
    began = time.perf_counter()
    stats = collect_stats(loaded.model, windows.input_ids, 8, scored, False, torch.bfloat16)
    print(f"statistics {key}: {time.perf_counter() - began:.0f} s", flush=True)
    torch.save(stats, path)
    return stats


def _parts(variant: str) -> tuple[str, list[tuple[float, str]], str]:
    """(scales key, Hessian terms (weight, key), Fisher key) of a variant."""
    if "|" not in variant:
        scale_key, hessian_key, fisher_key = variant
        if hessian_key in MIXED_SHARE:
            share = MIXED_SHARE[hessian_key]
            return scale_key, [(1 - share, "W"), (share, "M")], fisher_key
        return scale_key, [(1.0, hessian_key)], fisher_key
    scale_key, hessians, fisher_key = variant.split("|")
    terms = []
    for term in hessians.split("+"):
        weight, key = term.split("*") if "*" in term else ("1", term)
        terms.append((float(weight), key))
    return scale_key, terms, fisher_key


def _hybrid(sources: dict, variant: str) -> tuple[dict, dict]:
    """Statistics for `variant`, keeping the sharing of entries between linears that read
    one input (the pipeline computes one feedback factor per shared entry)."""
    scale_key, terms, fisher_key = _parts(variant)
    stats, made = {}, {}
    for name, entry in sources[scale_key][0].items():
        if id(entry) not in made:
            hessian = sum(w * sources[key][0][name].hessian for w, key in terms)
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
    results, save = open_results(args.work)
    variants = args.variants.split(",")
    needed = set()
    for variant in variants:
        scale_key, terms, fisher_key = _parts(variant)
        needed |= {scale_key, fisher_key, *(key for _, key in terms)}
    sources = {key: _statistics(args.work, key) for key in sorted(needed)}
    tokenizer = load_model(None).tokenizer
    evals = {
        "wiki": evaluation_windows("wiki", tokenizer, seq_len=512, max_windows=16),
        "code": evaluation_windows("code", tokenizer, seq_len=512, max_windows=8),
    }
    budgets = [int(float(mb) * 10**6) for mb in args.budgets_mb.split(",")]
    for variant in variants:
        entry = results.setdefault(variant, {})
        folder = args.work / variant.replace("|", "_").replace("*", "x").replace("+", "p")
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
                save()
            wiki, code = entry[str(budget)]
            print(f"{variant} {budget / 1e6:g} MB: wiki {wiki:.2f} code {code:.2f}", flush=True)
        del loaded


if __name__ == "__main__":
    main()
