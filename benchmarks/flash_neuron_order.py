"""Would storing FFN neurons in another order make the flash engine's reads cheaper? (issue 5)

A store may keep a layer's neuron bundles in any order (the FFN's output does not depend on
it). If neurons that fire together sat together, a token's wanted bundles would form longer
runs and the reader would read fewer unwanted bundles through gaps. This measures it on the
default model without building stores:

1. the neurons each token loads (the store's predictor at `--level`, as the engine selects
   them) are recorded over wiki and code evaluation windows through the masked dense model;
2. orders are fitted on the first `--fit-tokens` wiki tokens: identity (as stored), by firing
   frequency, a co-activation chain (greedy nearest neighbour on the Jaccard similarity of
   firing), and a spectral order (leading eigenvector of the firing correlation);
3. on the other tokens, each layer's reads are planned as the engine plans them
   (`memtool.serve.flash.io.span_arrays`, reads capped at 256 KiB) for every gap allowance in
   `GAPS`, and each order is scored by its best allowance under a cost model fitted to this
   machine's O_DIRECT reads (`--read-us` per read plus `--mb-per-s` transfer; BENCHMARKS.md).

The window (which keeps recent neurons) is left out: at the 50% budget it holds 26 of 1536
neurons per layer, and it helps every order alike.

    python benchmarks/flash_neuron_order.py [--store DIR] [--level 0.5] [--layers-step 3]
"""

import argparse
import json
from pathlib import Path

import torch

from memtool.data import evaluation_windows
from memtool.models import load_model
from memtool.serve.flash.engine import build_selectors
from memtool.serve.flash.io import MAX_READ_BYTES, span_arrays
from memtool.serve.flash.reference import masked_dense

GAPS = (0, 1, 2, 4, 6, 8, 12, 18, 24, 36, 48)  # unwanted bundles a read may cross


def record_masks(store: Path, level: str, wiki_windows: int, code_windows: int) -> list:
    """Per layer, the neurons each token loads [tokens, neurons] (bool): wiki, then code."""
    loaded = load_model(None, dtype="float32")
    selectors, _ = build_selectors(store, loaded.model, level)
    masks: list[list[torch.Tensor]] = [[] for _ in selectors]
    for index, selector in enumerate(selectors):
        predict = selector.mask

        def recording(x, predict=predict, index=index):
            mask, gate = predict(x)
            masks[index].append(mask.clone())
            return mask, gate

        selector.mask = recording
    tokenizer = loaded.tokenizer
    batches = [evaluation_windows("wiki", tokenizer, 512, wiki_windows).input_ids]
    batches.append(evaluation_windows("code", tokenizer, 512, code_windows).input_ids)
    with torch.no_grad(), masked_dense(loaded.model, selectors):
        for ids in batches:
            for start in range(0, ids.shape[0], 2):
                loaded.model(ids[start : start + 2])
    return [torch.cat(per_layer) for per_layer in masks]


def orders(fit: torch.Tensor) -> dict[str, torch.Tensor]:
    """Neuron orders fitted on firing patterns `fit` [tokens, neurons]."""
    fired = fit.float()
    count = fired.sum(0)
    together = fired.T @ fired
    jaccard = together / (count[:, None] + count[None, :] - together).clamp_min(1)
    placed = torch.zeros(count.numel(), dtype=torch.bool)
    current = int(torch.argmax(count))
    chain = [current]
    placed[current] = True
    for _ in range(count.numel() - 1):
        score = jaccard[current].clone()
        score[placed] = -1
        current = int(torch.argmax(score))
        chain.append(current)
        placed[current] = True
    _, vectors = torch.linalg.eigh(torch.corrcoef(fired.T).nan_to_num(0))
    return {
        "as stored": torch.arange(count.numel()),
        "by frequency": torch.argsort(count, descending=True),
        "co-activation chain": torch.tensor(chain),
        "spectral": torch.argsort(vectors[:, -1]),
    }


def plan_cost(masks: torch.Tensor, gap: int, stride: int) -> tuple[float, float]:
    """Mean reads and bytes per token of the engine's read plan for `masks` [tokens, n]."""
    reads = total = 0
    cap = MAX_READ_BYTES // stride
    for row in masks:
        _, count, _ = span_arrays(torch.nonzero(row).flatten(), gap, cap)
        reads += count.numel()
        total += int(count.sum()) * stride
    return reads / masks.shape[0], total / masks.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="/tmp/flash_bench/work/smollm2-store")
    parser.add_argument("--level", default="0.5")
    parser.add_argument("--wiki-windows", type=int, default=4)
    parser.add_argument("--code-windows", type=int, default=2)
    parser.add_argument("--fit-tokens", type=int, default=1024)
    parser.add_argument("--layers-step", type=int, default=3, help="score every Nth layer")
    parser.add_argument("--token-step", type=int, default=4, help="score every Nth token")
    parser.add_argument("--read-us", type=float, default=59.0)
    parser.add_argument("--mb-per-s", type=float, default=1200.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    store = Path(args.store)
    stride = json.loads((store / "flash_store.json").read_text())["layers"][0]["stride_bytes"]
    masks = record_masks(store, args.level, args.wiki_windows, args.code_windows)
    layers = range(0, len(masks), args.layers_step)
    totals: dict[str, dict] = {}
    for layer in layers:
        fit, test = masks[layer][: args.fit_tokens], masks[layer][args.fit_tokens :]
        for name, order in orders(fit).items():
            best = None
            for gap in GAPS:
                reads, size = plan_cost(test[:: args.token_step][:, order], gap, stride)
                ms = reads * args.read_us / 1e3 + size / (args.mb_per_s * 1e3)
                if best is None or ms < best["ms"]:
                    best = {"ms": ms, "reads": reads, "mb": size / 1e6, "gap": gap}
            entry = totals.setdefault(name, {"ms": 0.0, "reads": 0.0, "mb": 0.0, "gaps": []})
            for key in ("ms", "reads", "mb"):
                entry[key] += best[key] / len(layers)
            entry["gaps"].append(best["gap"])
    wanted = sum(float(masks[i][args.fit_tokens :].float().sum(1).mean()) for i in layers)
    report = {
        "level": args.level,
        "tokens_scored": masks[0].shape[0] - args.fit_tokens,
        "layers_scored": list(layers),
        "wanted_mb_per_layer": wanted / len(layers) * stride / 1e6,
        "orders": totals,
    }
    print(f"wanted bundles per layer: {report['wanted_mb_per_layer']:.2f} MB")
    print("order                 est. I/O ms/layer  reads/layer  MB/layer  best gap per layer")
    for name, entry in totals.items():
        print(
            f"{name:22s} {entry['ms']:16.2f} {entry['reads']:12.1f} {entry['mb']:9.2f}  "
            f"{entry['gaps']}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
