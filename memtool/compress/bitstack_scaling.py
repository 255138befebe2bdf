"""Calibration statistics for BitStack and folding its activation-aware scales into the model.

Per decoder linear, from one pass over the calibration windows through the float model:
- `scale` `[in]`: per input channel, the L2 norm along the tokens of each window, averaged over
  windows (what the official BitStack code uses). The decomposition sees `W diag(s)`, so columns
  that carry large activations are approximated more carefully.
- `hessian` `[in, in]`: the input second moment XᵀX / tokens, shared by linears that read the
  same tensor (q/k/v, gate/up), and
- `fisher` `[out]`: mean squared gradient of the loss with respect to each output channel,
  both from a few score windows only (`score_samples`: the first calibration windows, or
  windows of their own data, `score_data`, which then add nothing to the scales), run with
  backpropagation: they rank blocks against each other and steer the sign feedback
  (`feedback_factor`), and accumulating XᵀX over all 64 windows cost 130 s of the statistics
  pass on smollm2-135m. With `hessian`
  it turns a weight error E into an estimated loss increase Σ_i f_i (E H Eᵀ)_ii (a diagonal
  K-FAC approximation), which orders the stack (`memtool.compress.bitstack_order`).

Folding reuses AWQ's scaling groups (`memtool.compress.awq_groups`): where a norm or linear
feeds exactly a set of linears, dividing its output by `s` and multiplying their input columns
by `s` leaves the function unchanged, so no scale is stored. Llama family: input norm → q/k/v,
post-attention norm → gate/up, up → down, and v → o only when v and o have the same width
(grouped-query attention shares v channels between heads). Linears outside every group keep an
explicit input scale (`x / s` before the matmul), stored beside the stack and counted in its
bytes; an architecture without known groups gets explicit scales everywhere, with a warning.
"""

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from memtool.compress.awq_groups import apply_scale, check_supported, scaling_groups
from memtool.compress.hessian import LinearHooks, add_second_moment, inverse_hessian_factor
from memtool.compress.layers import decoder_layers, linear_children
from memtool.compress.precision import autocast_to
from memtool.errors import MemtoolError
from memtool.progress import counted_steps

_MIN_SCALE = 1e-6  # dead channels would otherwise divide by zero when folded


@dataclass
class LinearStats:
    """Statistics of one linear's input and output (see the module docstring)."""

    scale_sum: Tensor
    windows: int = 0
    hessian: Tensor | None = None
    hessian_rows: int = 0
    # Per reading linear (by name), from the score windows: Σ_t w_t x_t² `[in]` and Σ_t w_t,
    # with w_t the squared norm of that linear's output gradient at token t.
    token_weighted: dict[str, tuple[Tensor, float]] = field(default_factory=dict)

    @property
    def scale(self) -> Tensor:
        return (self.scale_sum / max(self.windows, 1)).clamp_min(_MIN_SCALE)

    def add_hessian(self, tokens: Tensor) -> None:
        """Fold `tokens` `[n, in]` into the running mean of xxᵀ."""
        if self.hessian is None:
            self.hessian = tokens.new_zeros(tokens.shape[1], tokens.shape[1])
        self.hessian_rows = add_second_moment(self.hessian, self.hessian_rows, tokens)


@dataclass
class Scaling:
    """How one linear's weight was scaled before decomposition: `W' = diag(1/r) W diag(s)`."""

    scale: Tensor  # s: input columns multiplied
    explicit: bool  # s is applied to the input at run time (not folded upstream)
    row_divisor: Tensor | None = None  # r: output rows divided (the linear feeds a folded scale)


@dataclass
class _InputRecorder(LinearHooks):
    """Forward hooks recording every linear's input statistics, sharing identical inputs."""

    linears: dict[str, nn.Linear]
    stats: dict[str, LinearStats] = field(default_factory=dict)
    hessian: bool = False  # also record input second moments
    scales: bool = True  # record the inputs' scales (off for windows outside the calibration)
    _last: tuple[Tensor, LinearStats] | None = None

    def _hook(self, name: str):
        def hook(module, args, output):
            x = args[0]
            if self._last is not None and self._last[0] is x:
                self.stats.setdefault(name, self._last[1])
                return
            entry = self.stats.get(name)
            if entry is None:
                entry = LinearStats(torch.zeros(x.shape[-1]))
                self.stats[name] = entry
            flat = x.detach().reshape(-1, x.shape[-2], x.shape[-1]).float()  # [B, L, in]
            if self.hessian:
                entry.add_hessian(flat.reshape(-1, flat.shape[-1]))
            if self.scales:
                entry.scale_sum += flat.pow(2).sum(dim=1).sqrt().sum(dim=0)
                entry.windows += flat.shape[0]
            self._last = (x, entry)

        return hook


def body_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every decoder layer's linears by full module name, in layer and forward order."""
    layers = decoder_layers(model)
    prefix = next(name for name, m in model.named_modules() if m is layers)
    return {
        f"{prefix}.{index}.{name}": module
        for index, layer in enumerate(layers)
        for name, module in linear_children(layer).items()
    }


def collect_stats(
    model: nn.Module,
    windows: Tensor,
    batch_size: int,
    fisher_windows: int,
    show_progress: bool = True,
    compute_dtype: torch.dtype | None = None,
    score_windows: Tensor | None = None,
    token_weights: bool = False,
) -> tuple[dict[str, LinearStats], dict[str, Tensor]]:
    """Input statistics of every decoder linear (linears reading the same input share one
    entry): scales over all `windows` `[n, L]`, and Hessians plus output Fisher diagonals from
    `fisher_windows` score windows (none when 0): the first of `windows`, or of
    `score_windows` when given (then they add nothing to the scales). `compute_dtype` (say
    bfloat16) runs the model's matmuls under autocast; the statistics are accumulated in
    float32 regardless. `token_weights` also records `LinearStats.token_weighted` (for
    `token_correlation`; it holds each linear's input through the backward)."""
    device_type = next(model.parameters()).device.type
    linears = body_linears(model)
    recorder = _InputRecorder(linears)
    scored = windows if score_windows is None else score_windows
    n_fisher = min(fisher_windows, scored.shape[0])
    fisher: dict[str, Tensor] = {}
    weighted: dict[str, tuple[Tensor, float]] | None = {} if token_weights else None
    skipped = n_fisher if score_windows is None else 0
    batches = range(skipped, windows.shape[0], batch_size)
    with counted_steps("statistics", len(batches) + n_fisher, show_progress) as (bar, task):
        # The scoring windows first, one at a time with backpropagation: when they are
        # calibration windows their forward also records their scales, so the scale pass
        # below skips them.
        recorder.hessian, recorder.scales = True, score_windows is None
        with recorder:
            for index in range(n_fisher):
                _accumulate_fisher(
                    model, linears, fisher, weighted, scored[index : index + 1], compute_dtype
                )
                recorder._last = None
                bar.advance(task)
        recorder.hessian, recorder.scales = False, True
        # The decoder body only: the output head's logits (49152 wide on smollm2) would cost a
        # fifth of the compute and 800 MB per batch of 8 windows, and no linear reads them.
        body = getattr(model, getattr(model, "base_model_prefix", ""), model)
        with recorder, torch.inference_mode(), autocast_to(device_type, compute_dtype):
            for start in batches:
                body(input_ids=windows[start : start + batch_size], use_cache=False)
                recorder._last = None
                bar.advance(task)
    missing = [name for name in linears if name not in recorder.stats]
    if missing:
        raise MemtoolError(f"calibration never reached {missing[0]}: cannot scale it")
    for name, entry in (weighted or {}).items():
        recorder.stats[name].token_weighted[name] = entry
    return recorder.stats, {name: total / n_fisher for name, total in fisher.items()}


def _accumulate_fisher(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    fisher: dict[str, Tensor],
    weighted: dict[str, tuple[Tensor, float]] | None,
    ids: Tensor,
    compute_dtype: torch.dtype | None,
) -> None:
    """Add one window's mean squared output gradients to each linear's `fisher`, and, unless
    `weighted` is None, its inputs' squares weighted by each token's squared output gradient
    norm to `weighted` (see `token_correlation`); the forward's matmuls under autocast to
    `compute_dtype`, if given.

    Parameters stop requiring gradients for the pass: only activation gradients are needed,
    and weight gradients would double the backward's cost and hold a model-sized buffer.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    handles = []

    def output_hook(name: str):
        def hook(module, args, output):
            inputs = args[0].detach() if weighted is not None else None

            def on_grad(grad: Tensor) -> None:
                per_token = grad.detach().float().pow(2).reshape(-1, grad.shape[-1])
                squared = per_token.mean(dim=0)
                fisher[name] = fisher[name] + squared if name in fisher else squared
                if weighted is None:
                    return
                token = per_token.sum(dim=1)
                inputs_sq = inputs.float().pow(2).reshape(-1, inputs.shape[-1])
                sums, total = weighted.get(name, (0.0, 0.0))
                weighted[name] = (sums + token @ inputs_sq, total + float(token.sum()))

            if output.requires_grad:
                output.register_hook(on_grad)

        return hook

    def embedding_hook(module, args, output):
        return output.requires_grad_()

    try:
        for p in params:
            p.requires_grad_(False)
        handles.append(model.get_input_embeddings().register_forward_hook(embedding_hook))
        handles += [m.register_forward_hook(output_hook(n)) for n, m in linears.items()]
        with torch.enable_grad():
            # The backward runs in the forward's dtypes, outside autocast.
            with autocast_to(ids.device.type, compute_dtype):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for p in params:
            p.requires_grad_(True)


@torch.no_grad()
def fold_scales(
    model: nn.Module, stats: dict[str, LinearStats]
) -> tuple[dict[str, Scaling], list[str]]:
    """Scale every decoder linear's input columns by its `scale`, folding `1/s` upstream where
    that is exact; returns each linear's `Scaling` and warnings."""
    layers = decoder_layers(model)
    prefix = next(name for name, m in model.named_modules() if m is layers)
    warnings: list[str] = []
    folded = True
    try:
        check_supported(model)
    except MemtoolError:
        folded = False
        kind = getattr(model.config, "model_type", type(model).__name__)
        warnings.append(
            f"no known scaling groups for model_type {kind!r}: every linear keeps an explicit "
            "input scale (exact, but a little slower and a few bytes larger)"
        )
    scalings: dict[str, Scaling] = {}
    for index, layer in enumerate(layers):
        base = f"{prefix}.{index}."
        groups = scaling_groups(model, layer) if folded else []
        for group in groups:
            scale = stats[base + group.linears[0]].scale
            apply_scale(layer, group, scale)
            for name in group.linears:
                scalings[base + name] = Scaling(scale, explicit=False)
        for group in groups:  # a prev linear's rows took 1/s: record it once all are scaled
            if isinstance(layer.get_submodule(group.prev), nn.Linear):
                scalings[base + group.prev].row_divisor = scalings[base + group.linears[0]].scale
        for name, module in linear_children(layer).items():
            if base + name not in scalings:
                scale = stats[base + name].scale
                module.weight.mul_(scale.view(1, -1).to(module.weight.dtype))
                scalings[base + name] = Scaling(scale, explicit=True)
    return scalings, warnings


def scaled_hessian(stats: LinearStats, scaling: Scaling) -> Tensor | None:
    """The input second moment in the scaled weight's space, `diag(1/s) H diag(1/s)` (the
    decomposed `W' = W diag(s)` reads `x / s`); None without statistics."""
    if stats.hessian is None:
        return None
    inverse = 1.0 / scaling.scale
    return stats.hessian * inverse.view(-1, 1) * inverse.view(1, -1)


@dataclass
class FeedbackFactor:
    """What `feedback_signs` needs, and what its per-row errors need to become estimates."""

    upper: Tensor  # upper Cholesky factor of the dampened scaled Hessian's inverse
    # What the dampening added to the scaled Hessian's diagonal (`[in]`): the feedback's
    # errors are measured under `H' + diag(diag_shift)`, the loss estimate under `H'`.
    diag_shift: Tensor


def feedback_factor(
    stats: LinearStats, scaling: Scaling, damp_percent: float
) -> FeedbackFactor | None:
    """The inverse scaled Hessian's upper Cholesky factor for `feedback_signs`, dampened as
    GPTQ dampens; None when there are no statistics or it stays indefinite."""
    hessian = scaled_hessian(stats, scaling)
    if hessian is None:
        return None
    dead = torch.diag(hessian) == 0  # never active in calibration: an independent column
    hessian[dead, dead] = 1
    upper, damp = inverse_hessian_factor(hessian, damp_percent, 1.0)
    if upper is None:
        return None
    shift = dead.to(hessian.dtype) + damp * torch.mean(torch.diag(hessian)).item()
    return FeedbackFactor(upper, shift)


def token_correlation(stats: LinearStats, name: str, scaling: Scaling) -> float:
    """How much more (or less) than K-FAC assumes the linear's loss reads its large inputs:
    `E[w |x'|²] / (E[w] E[|x'|²])` over the score windows' tokens, with `x' = x / s` the scaled
    weight's input and `w` the squared norm of the linear's output gradient (1 without
    statistics).

    The diagonal K-FAC estimate `Σ_i f_i (E H Eᵀ)_ii` takes the output gradients and the inputs
    as independent across tokens. They are not: on smollm2-135m the tokens with the largest
    scaled inputs (the attention sink's) get small gradients at `v_proj`, whose estimate K-FAC
    overstates 3-8x against the loss measured with each kind of linear truncated
    (BENCHMARKS.md), which steered the stack's bytes to `v_proj`. This factor, `1` when the
    two are uncorrelated, corrects the estimate's scale per linear (the output rows' divisors
    are left out of `w`). The full correction, `E H_w Eᵀ` with a gradient-weighted `H_w`,
    would cost the `out x in x in` product per block that the feedback's row errors avoid.
    """
    entry = stats.token_weighted.get(name)
    if entry is None or stats.hessian is None or entry[1] <= 0:
        return 1.0
    inverse_sq = scaling.scale.pow(-2)
    weighted = float((entry[0] * inverse_sq).sum()) / entry[1]
    plain = float((torch.diag(stats.hessian) * inverse_sq).sum())
    return weighted / plain if plain > 0 else 1.0


def loss_estimator(
    stats: LinearStats,
    fisher: Tensor | None,
    scaling: Scaling,
    diag_shift: Tensor | None = None,
    weight: float = 1.0,
):
    """A function mapping a residual of the scaled weight to its estimated loss increase.

    Back in the original weight space the error is `E = diag(r) E' diag(1/s)`; the estimate is
    `Σ_i f_i (E H Eᵀ)_ii = Σ_i f_i r_i² (E' H' E'ᵀ)_ii` with `H' = diag(1/s) H diag(1/s)`.
    Without statistics (`score_samples=0`) it falls back to ‖E'‖², the scaled residual's
    energy.

    Given, besides the residual, each row's `(E' (H' + diag(diag_shift)) E'ᵀ)_ii` (what the
    sign feedback computes on its way: `feedback_signs`'s `row_error`, with the feedback
    factor's `diag_shift`), the estimate subtracts the shift's part instead of forming
    `E' H'`: `out x in` operations rather than `out x in x in`, which was a third of the
    default decomposition's time on smollm2-135m.

    `weight` scales the estimate (`token_correlation`'s correction).
    """
    hessian = scaled_hessian(stats, scaling)
    rows = torch.ones(1) if fisher is None else fisher * weight
    if scaling.row_divisor is not None and fisher is not None:
        rows = rows * scaling.row_divisor.pow(2)

    def estimate(residual: Tensor, shifted_rows: Tensor | None = None) -> float:
        if shifted_rows is not None and diag_shift is not None:
            per_row = shifted_rows - residual.square() @ diag_shift.to(residual.dtype)
        else:
            product = residual if hessian is None else residual @ hessian
            per_row = (product * residual).sum(dim=1)
        return float((per_row * rows).sum())

    return estimate


__all__ = [
    "FeedbackFactor",
    "LinearStats",
    "Scaling",
    "body_linears",
    "collect_stats",
    "feedback_factor",
    "fold_scales",
    "loss_estimator",
    "scaled_hessian",
    "token_correlation",
]
