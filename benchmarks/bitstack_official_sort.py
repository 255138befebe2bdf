"""BitStack's ordering against the official perplexity sort, on the same blocks, at equal bytes.

The official code (`--score_importance`, then `sort_layers_and_bits_average`) orders a stack
by perplexity on a small scoring set: for each level b = 1 .. niter-1 it sets every linear to b
blocks, then raises one linear at a time to b+1 and measures perplexity; the stack then takes
all second blocks (each level's linears sorted by that perplexity, lowest first), then all
third blocks, and so on. This script runs that procedure on a memtool stack for the first few
levels (the issue's partial run: 2 x 512 scoring tokens, two levels, 17 minutes) and evaluates,
at the same byte budgets, the stack's own order (memtool's importance estimate), the official
sort and uniform allocation (level by level in linear order: the official code without its
sort), each a prefix of its order over the same blocks.

The scoring forwards are exact and cheaper than the official code's: every linear's weight is
held dense for the level being scored, and the hidden states entering each decoder layer at
that level are cached, so raising a linear of layer l reruns layers l.. only.

Usage:
  python benchmarks/bitstack_official_sort.py --work /tmp/bos [--stacks rank4,default]
      [--levels 3] [--score-windows 2] [--budgets-mb 88,96,104,112,120]

`--stacks` names any of STACKS below; `mixed-token-weighting` is calibrated and scored on
`mixed` text, the others on `wiki`. Budgets past the scored levels get memtool's order only.
"""

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from resumable import open_results
from torch import nn

from memtool import load_model
from memtool.compress import BitStackConfig, CalibrationConfig, compress
from memtool.compress.layers import capture_first_layer_inputs, run_layer
from memtool.data import evaluation_windows
from memtool.formats.bitstack_linear import BitStackLinear
from memtool.formats.bitstack_stack import StackFile
from memtool.metrics import perplexity
from memtool.metrics.sizes import weight_bytes
from memtool.models.layers import decoder_layers
from memtool.ops.reference import bitstack_reconstruct

STACKS = {
    # The official block shape (rank 4 everywhere, signs sign(R), every output row fitted
    # alike): the configuration.
    "rank4": BitStackConfig(rank=4, feedback=False, score_samples=8, output_weighting=0),
    "default": BitStackConfig(),
    # The same blocks ordered with the token-wise corrected estimate (`--token-weighting`).
    "rank4-token-weighting": BitStackConfig(
        rank=4, feedback=False, score_samples=8, token_weighting=True, output_weighting=0
    ),
    "default-token-weighting": BitStackConfig(token_weighting=True),
}
# Stacks calibrated on other text than wiki: `--calib mixed --token-weighting`, the
# configuration README recommends for a model serving more than one kind of text. Its
# official sort scores on the same calibration text (drawn with the next seed).
STACK_CALIB = {"mixed-token-weighting": "mixed"}
STACKS["mixed-token-weighting"] = STACKS["default-token-weighting"]


class _Dense(nn.Module):
    """A BitStack linear's weight at one level, held dense for the scoring forwards."""

    def __init__(self, module: BitStackLinear) -> None:
        super().__init__()
        self.weight = torch.zeros(module.out_features, module.in_features)
        self.input_scale = module.input_scale
        self.bias = module.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x / self.input_scale.to(x.dtype)
        return F.linear(x, self.weight, self.bias)


def _block(blocks, start: int, stop: int, in_features: int) -> torch.Tensor:
    signs, u, v = blocks
    return bitstack_reconstruct(signs[start:stop], u[start:stop], v[start:stop], in_features)


def official_sort(folder: Path, levels: int, score_ids: torch.Tensor) -> dict:
    """The official perplexity sort for levels 1 .. `levels`: per level, each linear's
    perplexity with it alone one block up (all others at the level), and the seconds taken."""
    loaded = load_model(folder)
    model = loaded.model
    modules = loaded.bitstack.modules
    blocks = [(m.signs, m.u, m.v) for m in modules]
    names = [spec.name for spec in loaded.bitstack.stack.linears]
    dense = []
    for name, module in zip(names, modules, strict=True):
        parent_name, _, child = name.rpartition(".")
        replacement = _Dense(module)
        setattr(model.get_submodule(parent_name), child, replacement)
        dense.append(replacement)
    layers = decoder_layers(model)
    layer_of = {}
    for index, layer in enumerate(layers):
        for sub in layer.modules():
            layer_of[id(sub)] = index
    norm, head = model.model.norm, model.get_output_embeddings()
    labels = score_ids[:, 1:]

    def ppl_from(hidden: torch.Tensor, start: int, kwargs: dict) -> float:
        for layer in layers[start:]:
            hidden = run_layer(layer, hidden, kwargs)
        logits = head(norm(hidden))[:, :-1]
        nll = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(dim=1)
        return float(torch.exp(nll.mean()))  # the official eval_ppl: mean of window means

    began = time.perf_counter()
    scores = []
    with torch.inference_mode():
        for level in range(1, levels + 1):
            for module, d, b in zip(modules, dense, blocks, strict=True):
                d.weight = _block(b, 0, level, module.in_features)
            captured = capture_first_layer_inputs(model, score_ids, score_ids.shape[0])
            hidden, kwargs = captured.hidden[0], captured.kwargs[0]
            inputs = []
            for layer in layers:
                inputs.append(hidden)
                hidden = run_layer(layer, hidden, kwargs)
            base = ppl_from(inputs[-1], len(layers) - 1, kwargs)
            level_ppls = []
            for index, (module, d, b) in enumerate(zip(modules, dense, blocks, strict=True)):
                kept = d.weight
                d.weight = kept + _block(b, level, level + 1, module.in_features)
                start = layer_of[id(d)]
                level_ppls.append(ppl_from(inputs[start], start, kwargs))
                d.weight = kept
                if index % 30 == 0:
                    seconds = time.perf_counter() - began
                    print(f"level {level}: {index}/{len(modules)} {seconds:.0f} s", flush=True)
            scores.append({"level": level, "base_ppl": base, "ppls": level_ppls})
    return {"seconds": time.perf_counter() - began, "levels": scores, "names": names}


def _orders(stack: StackFile, sort: dict) -> dict[str, list[int]]:
    """Each order as the sequence of linears receiving their next block after the first."""
    n_linears = len(stack.linears)
    stored = [entry[0] for entry in stack.stack[n_linears:]]
    official, uniform = [], []
    for level in sort["levels"]:
        ppls = level["ppls"]
        official += sorted(range(n_linears), key=lambda i: ppls[i])
        uniform += list(range(n_linears))
    return {"importance": stored, "official-sort": official, "uniform": uniform}


def _counts_for_budget(order, block_bytes, base_bytes, budget):
    counts = [1] * len(block_bytes)
    total = base_bytes + sum(block_bytes)
    for linear in order:
        if total + block_bytes[linear] > budget:
            break  # a prefix: the next block does not fit, so neither does the rest
        total += block_bytes[linear]
        counts[linear] += 1
    return counts, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--stacks", default="rank4,default")
    parser.add_argument("--levels", type=int, default=3, help="levels the official sort scores")
    parser.add_argument("--score-windows", type=int, default=2)
    parser.add_argument("--budgets-mb", default="88,96,104,112,120")
    parser.add_argument("--windows", type=int, default=16, help="wiki evaluation windows")
    parser.add_argument("--code-windows", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(2)
    results, save = open_results(args.work)

    tokenizer = load_model(None).tokenizer
    wiki = evaluation_windows("wiki", tokenizer, seq_len=512, max_windows=args.windows).input_ids
    code = evaluation_windows("code", tokenizer, seq_len=512, max_windows=args.code_windows)

    def score_ids(data: str) -> torch.Tensor:
        # The official scoring set: calibration text drawn with the next seed.
        config = CalibrationConfig(data=data, n_samples=args.score_windows, seed=1)
        return config.windows(tokenizer).input_ids

    for name in args.stacks.split(","):
        folder = args.work / name
        entry = results.setdefault(name, {})
        if "compress_s" not in entry:
            began = time.perf_counter()
            calibration = CalibrationConfig(STACK_CALIB.get(name, "wiki"), 64, seq_len=512)
            compress(None, STACKS[name], calibration, output=folder, overwrite=True,
                     show_progress=False)  # fmt: skip
            entry["compress_s"] = time.perf_counter() - began
            save()
        if "sort" not in entry:
            scoring = score_ids(STACK_CALIB.get(name, "wiki"))
            entry["sort"] = official_sort(folder, args.levels, scoring)
            save()
        print(name, f"official sort: {entry['sort']['seconds']:.0f} s", flush=True)
        loaded = load_model(folder)
        stack = loaded.bitstack.stack
        orders = _orders(stack, entry["sort"])
        modules = loaded.bitstack.modules
        blocks = [(m.signs, m.u, m.v) for m in modules]
        block_bytes = [spec.block_bytes for spec in stack.linears]
        scored_top = stack.meta["base_bytes"] + (args.levels + 1) * sum(block_bytes)
        points = entry.setdefault("points", {})
        for mb in (float(x) for x in args.budgets_mb.split(",")):
            budget = int(mb * 1e6)
            # Past the scored levels only memtool's order is complete.
            names = list(orders) if budget <= scored_top else ["importance"]
            for order_name in names:
                order = orders[order_name]
                key = f"{order_name}@{mb:g}"
                if key in points:
                    continue
                counts, total = _counts_for_budget(
                    order, block_bytes, stack.meta["base_bytes"], budget
                )
                for module, (signs, u, v), count in zip(modules, blocks, counts, strict=True):
                    module.set_blocks(signs[:count], u[:count], v[:count])
                measured = weight_bytes(loaded.model)
                assert measured == total, (measured, total)
                point = {"bytes": total, "max_blocks": max(counts)}
                for set_name, ids in (("wiki", wiki), ("code", code.input_ids)):
                    point[set_name] = perplexity(loaded.model, ids, 4, show_progress=False)
                    point[set_name] = point[set_name].perplexity
                points[key] = point
                save()
                print(name, key, point, flush=True)
    _report(results)


def _report(results: dict) -> None:
    for name, entry in results.items():
        sort = entry["sort"]
        print(f"\n{name}: compressed in {entry['compress_s']:.0f} s; official sort of "
              f"{len(sort['levels'])} levels in {sort['seconds']:.0f} s")  # fmt: skip
        budgets = sorted({key.split("@")[1] for key in entry["points"]}, key=float)
        print("| MB | importance (memtool) | official sort | uniform |")
        print("| --- | --- | --- | --- |")
        for mb in budgets:
            cells = []
            for order in ("importance", "official-sort", "uniform"):
                p = entry["points"].get(f"{order}@{mb}")
                cells.append(f"{p['wiki']:.1f} / {p['code']:.1f}" if p else "")
            print(f"| {mb} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
