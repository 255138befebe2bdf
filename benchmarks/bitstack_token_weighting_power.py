"""BitStack's importance order with the token-wise correction raised to a power, at equal bytes.

`--token-weighting` multiplies each linear's loss estimate by its token correlation `c`
(`memtool.compress.bitstack_scaling.token_correlation`); this orders one set of blocks with
`c ** alpha` for each alpha (0: the default order, 1: `--token-weighting`) and measures wiki
and code perplexity at each budget, each order a prefix of the same blocks. `c` per linear is
read off two stacks compressed with and without the correction (the blocks are identical; the
estimates differ by `c`), 64 x 512 `wiki` calibration windows, otherwise the default.

Usage: python benchmarks/bitstack_token_weighting_power.py --work /tmp/ptw \
    [--alphas 0,1,0.5] [--budgets-mb 96,104,112,120,88]
"""

import argparse
import json
from pathlib import Path

import torch
from bitstack_official_sort import _counts_for_budget
from resumable import open_results

from memtool import load_model
from memtool.compress import BitStackConfig, CalibrationConfig, compress
from memtool.compress.bitstack_order import LinearBlocks, order_stack
from memtool.data import evaluation_windows
from memtool.metrics import perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--alphas", default="0,1,0.5")
    parser.add_argument("--budgets-mb", default="96,104,112,120,88")
    args = parser.parse_args()
    torch.set_num_threads(2)
    results, save = open_results(args.work)
    estimates = {}
    for name, corrected in (("plain", False), ("token-weighting", True)):
        folder = args.work / name
        if not (folder / "bitstack.json").exists():
            compress(None, BitStackConfig(token_weighting=corrected),
                     CalibrationConfig("wiki", 64, seq_len=512), output=folder, overwrite=True,
                     show_progress=False)  # fmt: skip
        meta = json.loads((folder / "bitstack.json").read_text())
        estimates[name] = meta["estimated_loss_increase"]
    correlation = [
        b[0] / a[0] if a[0] > 0 else 1.0
        for a, b in zip(estimates["plain"], estimates["token-weighting"], strict=True)
    ]
    loaded = load_model(args.work / "plain")
    stack = loaded.bitstack.stack
    modules = loaded.bitstack.modules
    blocks = [(m.signs, m.u, m.v) for m in modules]
    block_bytes = [spec.block_bytes for spec in stack.linears]
    wiki = evaluation_windows("wiki", loaded.tokenizer, seq_len=512, max_windows=16).input_ids
    code = evaluation_windows("code", loaded.tokenizer, seq_len=512, max_windows=8).input_ids
    for alpha in (float(a) for a in args.alphas.split(",")):
        items = [
            LinearBlocks(size, tuple(e * c**alpha for e in errors))
            for size, errors, c in zip(block_bytes, estimates["plain"], correlation, strict=True)
        ]
        order = [linear for linear, _ in order_stack(items, "importance")[len(items) :]]
        for mb in (float(b) for b in args.budgets_mb.split(",")):
            key = f"{alpha}@{mb}"
            if key in results:
                continue
            budget = int(mb * 1e6)
            counts, total = _counts_for_budget(order, block_bytes, stack.meta["base_bytes"], budget)
            for module, (signs, u, v), count in zip(modules, blocks, counts, strict=True):
                module.set_blocks(signs[:count], u[:count], v[:count])
            results[key] = {"bytes": total}
            for text, ids in (("wiki", wiki), ("code", code)):
                measured = perplexity(loaded.model, ids, 4, show_progress=False)
                results[key][text] = measured.perplexity
            save()
            print(key, results[key], flush=True)


if __name__ == "__main__":
    main()
