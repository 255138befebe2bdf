"""How well a BitStack stack's importance estimates track the loss, per kind of linear.

For each kind (`q_proj`, `v_proj`, `down_proj`, ...) every linear of that kind is cut to c
blocks while the rest keep all theirs, and the calibration loss increase is measured on a few
windows of text; the stack's own estimate for that cut is the sum of those linears'
`estimated_loss_increase[c]` (less the full stack's). The estimate only orders the stack, so
its scale does not matter, but its ratio to the measurement should be the same for every kind:
a kind whose ratio is 5x lower is overvalued 5x against the others, and the stack's bytes drift
to it.

Usage:
  python benchmarks/bitstack_estimate_check.py STACK_DIR [STACK_DIR ...] [--windows 4]
      [--levels 1,2,3,4] [--data wiki] [--out FILE.json]
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bitstack_official_sort import _block, _Dense

from memtool import load_model
from memtool.compress import CalibrationConfig


def check(folder: Path, ids: torch.Tensor, levels: list[int]) -> list[dict]:
    """Measured and estimated loss increase for every (kind, level)."""
    loaded = load_model(folder)
    model = loaded.model
    modules = loaded.bitstack.modules
    stack = loaded.bitstack.stack
    names = [spec.name for spec in stack.linears]
    errors = stack.meta["estimated_loss_increase"]
    blocks = [(m.signs, m.u, m.v) for m in modules]
    dense = []
    for name, module, b in zip(names, modules, blocks, strict=True):
        parent, _, child = name.rpartition(".")
        replacement = _Dense(module)
        replacement.weight = _block(b, 0, module.signs.shape[0], module.in_features)
        setattr(model.get_submodule(parent), child, replacement)
        dense.append(replacement)

    def loss() -> float:
        total = 0.0
        with torch.inference_mode():
            for start in range(0, ids.shape[0], 2):
                batch = ids[start : start + 2]
                logits = model(batch).logits[:, :-1]
                total += float(
                    F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="sum")
                )
        return total / (ids.shape[0] * (ids.shape[1] - 1))

    base = loss()
    rows = []
    for kind in sorted({name.rsplit(".", 1)[-1] for name in names}):
        members = [i for i, name in enumerate(names) if name.rsplit(".", 1)[-1] == kind]
        for level in levels:
            kept = {i: dense[i].weight for i in members}
            for i in members:
                dense[i].weight = _block(blocks[i], 0, level, modules[i].in_features)
            measured = loss() - base
            for i, weight in kept.items():
                dense[i].weight = weight
            estimated = sum(errors[i][level] - errors[i][-1] for i in members)
            rows.append(
                {"kind": kind, "level": level, "measured": measured, "estimated": estimated}
            )
    return rows


def _spread(rows: list[dict]) -> dict[str, float]:
    """Each kind's geometric-mean ratio of measured to estimated, over the median kind's."""
    by_kind: dict[str, list[float]] = {}
    for row in rows:
        by_kind.setdefault(row["kind"], []).append(math.log(row["measured"] / row["estimated"]))
    means = {kind: sum(v) / len(v) for kind, v in by_kind.items()}
    middle = sorted(means.values())[len(means) // 2]
    return {kind: math.exp(value - middle) for kind, value in means.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stacks", type=Path, nargs="+")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--levels", default="1,2,3,4")
    parser.add_argument("--data", default="wiki")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    levels = [int(x) for x in args.levels.split(",")]
    tokenizer = load_model(None).tokenizer
    # Calibration text drawn with another seed than the stacks' calibration (seed 0).
    config = CalibrationConfig(data=args.data, n_samples=args.windows, seq_len=512, seed=1)
    ids = config.windows(tokenizer).input_ids
    results = {}
    for folder in args.stacks:
        began = time.perf_counter()
        rows = check(folder, ids, levels)
        spread = _spread(rows)
        results[str(folder)] = {"rows": rows, "relative_ratio": spread}
        print(
            f"\n{folder} ({time.perf_counter() - began:.0f} s; {args.data}, {args.windows} x 512)"
        )
        print(
            "| kind | "
            + " | ".join(f"c={c}: measured / estimated" for c in levels)
            + " | vs median kind |"
        )
        print("| --- | " + " | ".join("---" for _ in levels) + " | --- |")
        for kind in spread:
            cells = [
                f"{r['measured']:.3f} / {r['estimated']:.2e}" for r in rows if r["kind"] == kind
            ]
            print(f"| {kind} | " + " | ".join(cells) + f" | {spread[kind]:.2f} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
