"""Two per-block refinements of BitStack's sign feedback, measured on single layers, held out.

For a few linears of smollm2-135m (q_proj, gate_proj, down_proj of layers 3, 15 and 27), four
blocks are peeled as the pipeline does (scaled weight, randomized SVD of |R|, fp16 factors,
feedback signs through the dampened score-window Hessian) and, per mode, refined:
- `refit`: each row's magnitude factor `u` refitted by least squares under the dampened
  Hessian once the signs are chosen (`v` kept);
- `cd`: one coordinate-descent pass over each row's signs minimising `e H eᵀ` (CDQuant-style),
  after the feedback;
- `cd+refit`: both.
Printed per block: the output error `tr(E H Eᵀ) / tr(W H Wᵀ)` under the score windows' Hessian
(in sample), and under Hessians of the wiki and code evaluation windows (held out).

Needs the statistics `bitstack_stat_sources.py` saves (`--stats W|M|C` picks the calibration).
Usage: python benchmarks/bitstack_block_refinements.py --work /tmp/hyb --stats M
"""

import argparse
from pathlib import Path

import torch

from memtool import load_model
from memtool.compress.bitstack import FACTOR_DTYPE, auto_rank, feedback_signs, low_rank
from memtool.compress.bitstack_scaling import (
    Scaling,
    body_linears,
    collect_stats,
    feedback_factor,
    scaled_hessian,
)
from memtool.data import evaluation_windows

DAMP = 0.3  # BitStackConfig's default dampening
MODES = ("feedback", "refit", "cd", "cd+refit")


def refit_rows(rest, signs, v, hessian):
    """Each row's `u` minimising `(r - S ⊙ u vᵀ) H (…)ᵀ`: a K x K solve per row."""
    features = torch.stack([signs * v[:, k] for k in range(v.shape[1])], 1)  # [m, K, n]
    weighted = features @ hessian  # [m, K, n]
    gram = weighted @ features.transpose(1, 2)
    target = (weighted @ rest.unsqueeze(2)).squeeze(2)
    ridge = 1e-6 * gram.diagonal(dim1=1, dim2=2).mean(1).view(-1, 1, 1)
    return torch.linalg.solve(gram + ridge * torch.eye(v.shape[1]), target)


def descend_signs(rest, signs, magnitude, hessian):
    """One pass over the columns, flipping a row's sign wherever that lowers `e H eᵀ`."""
    error_h = (rest - signs * magnitude) @ hessian
    diagonal = hessian.diagonal()
    for col in range(rest.shape[1]):
        step = 2 * signs[:, col] * magnitude[:, col]  # a flip adds this to the error
        flip = 2 * step * error_h[:, col] + step * step * diagonal[col] < 0
        if flip.any():
            error_h.addr_(torch.where(flip, step, torch.zeros_like(step)), hessian[col])
            signs[:, col] = torch.where(flip, -signs[:, col], signs[:, col])
    return signs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--stats", default="M")
    parser.add_argument("--blocks", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(2)
    calibration = torch.load(args.work / f"stats_{args.stats}.pt", weights_only=False)[0]
    loaded = load_model(None)
    held_path = args.work / "stats_eval.pt"
    if held_path.exists():
        held = torch.load(held_path, weights_only=False)
    else:
        held = {}
        for data, count in (("wiki", 16), ("code", 8)):
            ids = evaluation_windows(data, loaded.tokenizer, 512, max_windows=count).input_ids
            held[data] = collect_stats(loaded.model, ids, 8, count, False, torch.bfloat16)[0]
        torch.save(held, held_path)
    linears = body_linears(loaded.model)
    chosen = [
        name
        for name in linears
        if any(f"layers.{i}." in name for i in (3, 15, 27))
        and any(kind in name for kind in ("q_proj", "gate_proj", "down_proj"))
    ]
    for name in chosen:
        weight = linears[name].weight.detach().float()
        scaling = Scaling(calibration[name].scale, explicit=True)
        scaled = weight * scaling.scale.view(1, -1)
        hessian = scaled_hessian(calibration[name], scaling)
        damped = hessian + DAMP * hessian.diagonal().mean() * torch.eye(hessian.shape[0])
        hinv = feedback_factor(calibration[name], scaling, DAMP).upper
        held_h = [scaled_hessian(held[data][name], scaling) for data in ("wiki", "code")]
        rank = auto_rank(*weight.shape, 1.25)

        def relative(residual, h, w=scaled):
            return float(((residual @ h) * residual).sum() / ((w @ h) * w).sum())

        print(f"{name} (rank {rank}): in sample / held-out wiki / held-out code, per block")
        for mode in MODES:
            torch.manual_seed(0)
            rest, cells = scaled.clone(), []
            for _ in range(args.blocks):
                u, v = low_rank(rest.abs(), rank, False)
                u16, v16 = u.to(FACTOR_DTYPE), v.to(FACTOR_DTYPE)
                magnitude = u16.float() @ v16.float().T
                signs = feedback_signs(rest, magnitude, hinv)
                if "cd" in mode:
                    signs = descend_signs(rest, signs, magnitude, damped)
                if "refit" in mode:
                    u16 = refit_rows(rest, signs, v16.float(), damped).to(FACTOR_DTYPE)
                    magnitude = u16.float() @ v16.float().T
                rest = rest - signs * magnitude
                errors = [relative(rest, h) for h in (hessian, *held_h)]
                cells.append("/".join(f"{e:.4f}" for e in errors))
            print(f"  {mode:<9} " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
