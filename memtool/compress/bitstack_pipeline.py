"""`compress(..., BitStackConfig())`: statistics, scaling, decomposition, ordering, writing.

Memory stays at about one float model plus the stack: each linear's float weight is released
as soon as its blocks exist, and the input Hessians (one per distinct linear input, about 13 MB
per decoder layer of smollm2-135m) are the only calibration state kept.
"""

import dataclasses
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from memtool.compress.bitstack import auto_rank, check_rank, decompose
from memtool.compress.bitstack_order import LinearBlocks, order_stack
from memtool.compress.bitstack_scaling import (
    FeedbackFactor,
    Scaling,
    body_linears,
    collect_stats,
    feedback_factor,
    fold_scales,
    loss_estimator,
    token_correlation,
)
from memtool.compress.config import DEFAULT_SCORE_SAMPLES, BitStackConfig, CalibrationConfig
from memtool.compress.precision import dtype_name, resolve_compute_dtype
from memtool.errors import MemtoolError
from memtool.formats.bitstack_stack import INPUT_SCALE, LinearSpec, encode_block, write_stack
from memtool.formats.checkpoint_io import narrow, unpacked_tensors
from memtool.models import LoadedModel
from memtool.progress import counted_steps

_STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def compress_bitstack(
    loaded: LoadedModel,
    config: BitStackConfig,
    calibration: CalibrationConfig,
    output: Path,
    show_progress: bool = True,
) -> dict:
    """Decompose `loaded`'s decoder linears into a stack written to `output`.

    Returns a summary: calibration used, warnings, phase timings, stack sizes.
    """
    model = loaded.model
    linears = body_linears(model)
    ranks = {}
    for name, module in linears.items():
        rank = config.rank or auto_rank(module.out_features, module.in_features, config.block_bits)
        check_rank(module.out_features, module.in_features, rank, name)
        ranks[name] = rank
    if config.score_samples is None:
        score = DEFAULT_SCORE_SAMPLES
        if config.score_data is None:
            score = min(score, calibration.n_samples)
        config = dataclasses.replace(config, score_samples=score)
    elif config.score_data is None and config.score_samples > calibration.n_samples:
        raise MemtoolError(
            f"--score-samples {config.score_samples} is more than the {calibration.n_samples} "
            "calibration windows; lower it or raise --calib-samples"
        )
    windows = calibration.windows(loaded.tokenizer)
    score_windows = None
    if config.score_data is not None:
        score_windows = calibration.windows(
            loaded.tokenizer, config.score_data, config.score_samples
        )
    phases: dict[str, float] = {}
    mark = time.perf_counter()
    compute_dtype = resolve_compute_dtype(config.stats_dtype, next(model.parameters()).device)
    stats, fisher = collect_stats(
        model,
        windows.input_ids,
        calibration.batch_size,
        config.score_samples,
        show_progress,
        compute_dtype,
        score_windows=None if score_windows is None else score_windows.input_ids,
        token_weights=config.token_weighting,
    )
    phases["statistics"] = time.perf_counter() - mark
    used_dtype = dtype_name(compute_dtype)
    mark = time.perf_counter()
    if config.scale:
        scalings, warnings = fold_scales(model, stats)
    else:
        scalings = {
            n: Scaling(torch.ones(m.in_features), explicit=False) for n, m in linears.items()
        }
        warnings = []
    torch.manual_seed(config.seed)
    specs, per_linear, blocks_of = [], [], []
    # Linears that read one input (q/k/v, gate/up) come one after another and share its
    # statistics and scale, so their feedback factor is computed once; only the latest is kept.
    last_factor: tuple[tuple[int, int], FeedbackFactor | None] | None = None
    with counted_steps("decomposing", len(linears), show_progress) as (bar, task):
        for name, module in linears.items():
            factor = None
            if config.feedback:
                key = (id(stats[name]), id(scalings[name].scale))
                if last_factor is None or last_factor[0] != key:
                    last_factor = (
                        key,
                        feedback_factor(stats[name], scalings[name], config.damp_percent),
                    )
                factor = last_factor[1]
                if factor is None:
                    warnings.append(f"{name}: input Hessian indefinite, signs without feedback")
            estimate = loss_estimator(
                stats[name],
                fisher.get(name),
                scalings[name],
                None if factor is None else factor.diag_shift,
                token_correlation(stats[name], name, scalings[name])
                if config.token_weighting
                else 1.0,
            )
            blocks, errors = decompose(
                module.weight,
                config.niter,
                ranks[name],
                residual=config.residual,
                exact_svd=config.exact_svd,
                error=estimate,
                hinv_upper=None if factor is None else factor.upper,
                row_weight=_row_weight(fisher.get(name), scalings[name], config.output_weighting),
            )
            module.weight = nn.Parameter(torch.empty(0), requires_grad=False)  # free it now
            spec = LinearSpec(
                name,
                module.out_features,
                module.in_features,
                ranks[name],
                config.niter,
                scalings[name].explicit,
            )
            specs.append(spec)
            per_linear.append(LinearBlocks(blocks[0].nbytes, tuple(errors)))
            blocks_of.append(blocks)
            bar.advance(task)
    del stats
    phases["decompose"] = time.perf_counter() - mark
    mark = time.perf_counter()
    order = order_stack(per_linear, config.order)
    stack = []
    for linear, index in order:
        block = blocks_of[linear][index]
        stack.append((linear, index, encode_block(block.signs, block.u, block.v)))
    phases["order"] = time.perf_counter() - mark
    mark = time.perf_counter()
    storage = _storage_dtype(loaded)
    base = _base_tensors(model, linears, scalings, storage)
    model_config = model.config.to_dict()
    model_config.pop("quantization_config", None)
    model_config.pop("torch_dtype", None)
    model_config["dtype"] = str(storage).removeprefix("torch.")
    extra = {
        "settings": {"method": config.method, **vars(config)},
        "statistics_dtype": used_dtype,
        "calibration": windows.to_dict(),
        "score_calibration": None if score_windows is None else score_windows.to_dict(),
        "scaling": {
            "folded": sorted(n for n, s in scalings.items() if config.scale and not s.explicit),
            "explicit": sorted(n for n, s in scalings.items() if s.explicit),
        },
        "estimated_loss_increase": [list(item.errors) for item in per_linear],
    }
    meta = write_stack(output, model_config, loaded.tokenizer, base, specs, stack, extra)
    phases["write"] = time.perf_counter() - mark
    return {
        "calibration": windows.to_dict(),
        "score_calibration": extra["score_calibration"],
        "warnings": warnings,
        "phase_seconds": phases,
        "statistics_dtype": used_dtype,
        "quantized_layers": len(specs),
        "min_bytes": meta["weight_bytes"][0],
        "max_bytes": meta["weight_bytes"][-1],
        "blocks": len(stack),
        "ranks": sorted(set(ranks.values())),
    }


def _row_weight(fisher: torch.Tensor | None, scaling: Scaling, power: float):
    """Each output row's weight in the magnitude fit (see `decompose`): the square root of its
    share of the loss estimate, `f_i r_i²` (`loss_estimator`), raised to `power`, over its
    mean; None without Fisher or at power 0.

    Floored at 1% of the mean so that a row no score window's gradient reached keeps a finite
    factor (its `u` is stored divided by the weight). Normalised in log space, so that a large
    power cannot overflow float32; None also where no row got any gradient."""
    if fisher is None or power == 0:
        return None
    rows = fisher if scaling.row_divisor is None else fisher * scaling.row_divisor.pow(2)
    if not bool((rows > 0).any()):
        return None
    log_weight = rows.double().log() * (power / 2)  # -inf for rows without gradient
    log_mean = torch.logsumexp(log_weight, dim=0) - math.log(rows.numel())
    return (log_weight - log_mean).exp().float().clamp_min(1e-2)


def _storage_dtype(loaded: LoadedModel) -> torch.dtype:
    """The source checkpoint's 16-bit dtype (bfloat16 when it was not 16-bit)."""
    if loaded.path is not None and (loaded.path / "config.json").is_file():
        config = json.loads((loaded.path / "config.json").read_text())
        name = config.get("dtype") or config.get("torch_dtype")
        if name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
    return torch.bfloat16


def _base_tensors(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    scalings: dict[str, Scaling],
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Everything but the decomposed weights, tied tensors once, in `dtype`, plus the explicit
    input scales."""
    why = "this model cannot be stored in 16 bits"
    tensors = unpacked_tensors(model, linears, dtype, why)
    for name, scaling in scalings.items():
        if scaling.explicit:
            tensors[f"{name}.{INPUT_SCALE}"] = narrow(scaling.scale, dtype, why)
    return tensors
