"""GPTQ: one linear layer quantized column by column with second-order error compensation.

Paper: Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers" (ICLR 2023). With H = 2 XᵀX / n the Hessian of the layer's
reconstruction loss over calibration inputs X, each column is rounded in turn and its rounding
error is spread over the columns not yet quantized through the inverse Hessian's Cholesky factor
(lazy batch updates in blocks of `block_size` columns).

What we do differently from the reference code:
- dampening starts at `damp_percent` of the mean diagonal and is multiplied by 10 whenever the
  Cholesky factorisation fails (up to `max_damp_percent`); if it still fails the layer falls
  back to round-to-nearest and the caller gets the reason to warn with;
- act-order fits each group when reached in act order, on the weights as updated so far (the
  reference's and GPTQModel's `desc_act` without `static_groups`), so g_idx is shuffled
  (`GPTQLinear` sorts such rows at load); `static_groups=True` fits group parameters on the
  original column order before the permutation instead, so g_idx stays i // group_size and
  inference needs no reordering at all, at some cost in accuracy (see `GPTQConfig`). Without
  act-order, groups are always fitted when reached, as in the reference;
- group parameters are fitted with float16-rounded scales (see `quantizer.fit_params`).
"""

from dataclasses import dataclass

import torch

from memtool.compress.hessian import inverse_hessian_factor
from memtool.compress.quantizer import (
    QuantizedWeight,
    check_bits,
    fit_params,
    resolve_group_size,
    rtn_quantize,
)


@dataclass
class GPTQResult:
    weight: QuantizedWeight
    damp_percent: float | None  # dampening that worked; None when RTN was used instead
    fallback_reason: str | None = None


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    act_order: bool = False,
    damp_percent: float = 0.01,
    max_damp_percent: float = 1.0,
    block_size: int = 128,
    static_groups: bool = False,
) -> GPTQResult:
    """Quantize `weight` [out, in] given the Hessian [in, in] of its inputs.

    Args:
        weight: the layer's weight (any float dtype; computed in float32).
        hessian: 2 XᵀX / n accumulated over calibration inputs X [n, in].
        bits: code width (2, 3, 4 or 8).
        group_size: columns per group; -1 for one group per row.
        sym: symmetric (zero fixed at 2^(bits-1)) or asymmetric groups.
        act_order: quantize columns in order of decreasing Hessian diagonal.
        damp_percent: initial dampening, a fraction of the mean diagonal.
        max_damp_percent: give up (RTN fallback) past this dampening.
        block_size: columns per lazy batch update.
        static_groups: with act-order, fit groups on the original column order up front
            (g_idx = i // group_size); False: fit them in act order when reached.
    """
    check_bits(bits)
    w = weight.detach().float().clone()
    out_features, in_features = w.shape
    group_size = resolve_group_size(group_size, in_features)
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0  # columns never active in calibration: weight irrelevant
    h[dead, dead] = 1
    w[:, dead] = 0

    n_groups = -(-in_features // group_size)
    scales = torch.empty(out_features, n_groups, dtype=torch.float32)
    zeros = torch.empty(out_features, n_groups, dtype=torch.float32)
    static = act_order and static_groups
    if static:
        # Static groups: fitted on the original columns up front, so the permutation cannot
        # scramble them and g_idx stays i // group_size.
        for g in range(n_groups):
            cols = slice(g * group_size, min((g + 1) * group_size, in_features))
            scales[:, g], zeros[:, g] = fit_params(w[:, cols], bits, sym)
    group_of = torch.arange(in_features) // group_size

    perm = torch.argsort(torch.diag(h), descending=True) if act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
        if static:  # a column keeps its original group; dynamic groups follow act order
            group_of = group_of[perm]

    hinv, damp = inverse_hessian_factor(h, damp_percent, max_damp_percent)
    if hinv is None:
        reason = f"Hessian not positive definite even with dampening {max_damp_percent:g}"
        return GPTQResult(rtn_quantize(weight, bits, group_size, sym), None, reason)

    # Work on Wᵀ: each input column becomes a contiguous row, so the per-column steps and the
    # rank-1 updates touch contiguous memory (the inner loop is the hot path on CPU).
    wt = w.T.contiguous()
    scales_t, zeros_t = scales.T.contiguous(), zeros.T.contiguous()
    codes_t = torch.empty_like(wt)
    groups = group_of.tolist()
    maxq = 2**bits - 1
    for start in range(0, in_features, block_size):
        stop = min(start + block_size, in_features)
        hinv_block = hinv[start:stop, start:stop]
        err_block = torch.empty(stop - start, out_features)
        for j in range(stop - start):
            col = start + j
            g = groups[col]
            if not static and col % group_size == 0:
                # Fit each group when reached, on the weights as updated by the errors of
                # earlier columns (the reference GPTQ behaviour); with act-order and dynamic
                # groups, a group is the next `group_size` columns in act order.
                rows = wt[col : min(col + group_size, in_features)]
                scales_t[g], zeros_t[g] = fit_params(rows.T, bits, sym)
            row = wt[col]
            q = torch.div(row, scales_t[g]).round_().add_(zeros_t[g]).clamp_(0, maxq)
            codes_t[col] = q
            err = (row - (q - zeros_t[g]) * scales_t[g]).div_(hinv_block[j, j])
            err_block[j] = err
            wt[col + 1 : stop].addr_(hinv_block[j, j + 1 :], err, alpha=-1)
        wt[stop:].addmm_(hinv[start:stop, stop:].T, err_block, alpha=-1)
    codes = codes_t.T
    scales, zeros = scales_t.T.contiguous(), zeros_t.T.contiguous()

    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    g_idx = torch.arange(in_features) // group_size
    if perm is not None and not static:
        g_idx = g_idx[torch.argsort(perm)]  # column perm[i] was quantized i-th
    g_idx = g_idx.to(torch.int32)
    quantized = QuantizedWeight(
        codes.to(torch.uint8), scales, zeros.to(torch.int32), g_idx, bits, group_size, sym
    )
    return GPTQResult(quantized, damp)
