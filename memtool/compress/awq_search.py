"""AWQ's two grid searches: the per-channel scale of a group, and the clipping of a linear.

Both follow AutoAWQ `awq/quantize/quantizer.py` (`_search_best_scale`/`_compute_best_scale` and
`_compute_best_clip`) and use memtool's own quantizer (`memtool.compress.quantizer`), so a
candidate is judged with exactly the rounding it will get.
"""

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from memtool.compress.quantizer import fit_params, quantize_codes, resolve_group_size

# A recorded call of a module: its positional and keyword arguments for one batch.
Call = tuple[tuple[Any, ...], dict[str, Any]]
# Fake quantization of a whole weight [out, in] (codes dequantized back to float).
FakeQuantizer = Callable[[torch.Tensor], torch.Tensor]


def channel_mean_abs(inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """s_x: mean |x| per input channel over every calibration token (float32 [channels])."""
    total, count = None, 0
    for x in inputs:
        flat = x.reshape(-1, x.shape[-1]).float()
        part = flat.abs().sum(dim=0)
        total = part if total is None else total + part
        count += flat.shape[0]
    return total / count


def weight_mean(weights: Sequence[torch.Tensor], group_size: int) -> torch.Tensor:
    """Mean over rows of |w| / max |w| of its (row, group): AutoAWQ's `duo_scaling` w_mean."""
    w = torch.cat([t.float() for t in weights], dim=0).abs()
    size = resolve_group_size(group_size, w.shape[1])
    parts = [
        block / (block.amax(dim=1, keepdim=True) + 1e-6) for block in w.split(size, dim=1)
    ]  # split keeps a ragged last group
    return torch.cat(parts, dim=1).mean(dim=0)


def _output(module: nn.Module, call: Call) -> torch.Tensor:
    out = module(*call[0], **call[1])
    return (out[0] if isinstance(out, tuple) else out).float()


@torch.inference_mode()
def search_scale(
    linears: Sequence[nn.Linear],
    inspect: nn.Module,
    calls: Sequence[Call],
    x_mean: torch.Tensor,
    fake_quantize: FakeQuantizer,
    n_grid: int = 20,
    w_mean: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float, float]:
    """The scale s minimising ||inspect(Q(W diag(s)) diag(s)^-1, x) - inspect(W, x)||².

    For alpha in {0, 1/n_grid, ..., (n_grid-1)/n_grid}: s = s_x^alpha (divided by
    w_mean^(1-alpha) when `w_mean` is given, AutoAWQ's duo scaling), normalised by
    sqrt(max(s) min(s)). Each of `linears` gets its weight replaced by the fake-quantized scaled
    weight divided back by s (what the model computes once s is folded into the previous op), the
    `inspect` module is rerun on the recorded calls, and the mean squared output error against
    the float output decides. Alpha = 0 is s = 1: plain round-to-nearest is always a candidate.
    Weights are restored before returning.

    Returns:
        (best scales float32 [channels], best alpha, its mean squared error).
    """
    reference = [_output(inspect, call) for call in calls]
    originals = [linear.weight.detach().clone() for linear in linears]
    n_elements = sum(r.numel() for r in reference)
    best = (torch.ones_like(x_mean), 0.0, float("inf"))
    try:
        for step in range(n_grid):
            alpha = step / n_grid
            scales = x_mean.pow(alpha).clamp(min=1e-4)
            if w_mean is not None:
                scales = (scales / (w_mean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
            scales = scales / (scales.max() * scales.min()).sqrt()
            for linear, weight in zip(linears, originals, strict=True):
                scaled = weight.float() * scales.view(1, -1)
                linear.weight.copy_(fake_quantize(scaled) / scales.view(1, -1))
            error = sum(
                (_output(inspect, call) - ref).pow(2).sum().item()
                for call, ref in zip(calls, reference, strict=True)
            )
            error /= n_elements
            if error < best[2]:
                best = (scales.clone(), alpha, error)
    finally:
        for linear, weight in zip(linears, originals, strict=True):
            linear.weight.copy_(weight)
    return best


def sample_tokens(inputs: Sequence[torch.Tensor], n_tokens: int) -> torch.Tensor:
    """Every k-th calibration token (k = total // n_tokens, at least 1), as AutoAWQ samples the
    clip search's inputs; float32 [~n_tokens, channels]."""
    flat = [x.reshape(-1, x.shape[-1]) for x in inputs]
    total = sum(f.shape[0] for f in flat)
    step = max(1, total // n_tokens)
    picked, offset = [], 0
    for f in flat:
        start = (-offset) % step  # the next multiple of step inside this batch
        picked.append(f[start::step].float())
        offset += f.shape[0]
    return torch.cat(picked, dim=0)


@torch.inference_mode()
def search_clip(
    weight: torch.Tensor,
    x: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    n_grid: int = 20,
    max_shrink: float = 0.5,
) -> torch.Tensor:
    """Clip each (row, group) of `weight` [out, in] to the max |w| that best preserves outputs.

    For shrink ratios r in {0, 1/n_grid, ..., < max_shrink}, clamp the group to
    ±(1 - r)·max|w|, fake-quantize it, and keep per (row, group) the r with the smallest mean
    squared error of the group's partial output x_g·w_gᵀ over the sampled tokens `x`
    [tokens, in]. Groups quantize independently, so choosing per (row, group) is exact.

    Returns:
        The clipped float32 weight (r = 0, no clipping, is always a candidate).
    """
    w_all = weight.detach().float()
    size = resolve_group_size(group_size, w_all.shape[1])
    clipped = torch.empty_like(w_all)
    for start in range(0, w_all.shape[1], size):
        cols = slice(start, min(start + size, w_all.shape[1]))
        w, xg = w_all[:, cols], x[:, cols]
        reference = xg @ w.T  # [tokens, out]
        max_abs = w.abs().amax(dim=1, keepdim=True)
        best_max = max_abs.clone()
        best_err = torch.full_like(max_abs, float("inf"))
        for step in range(int(max_shrink * n_grid)):
            limit = max_abs * (1 - step / n_grid)
            candidate = torch.clamp(w, -limit, limit)
            scale, zero = fit_params(candidate, bits, sym)
            codes = quantize_codes(candidate, scale, zero, bits)
            dequantized = scale[:, None] * (codes - zero[:, None])
            err = (xg @ dequantized.T - reference).pow(2).mean(dim=0).view(-1, 1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better, limit, best_max)
        clipped[:, cols] = torch.clamp(w, -best_max, best_max)
    return clipped
