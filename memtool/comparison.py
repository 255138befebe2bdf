"""`compare`: one table for a base model and its variants (`memtool measure BASE V1 V2 ...`).

Every model is measured with the same `MeasureConfig` on every data set; BitStack stacks are
measured at each of `budgets` (one loaded model resized in place), so they show as a curve.
Each row gets its change against the base (the first model, or the first budget of a stack
given first) and whether it lies on the Pareto frontier of weight bytes against perplexity on
the first data set: no other row is at most as large and strictly better, or strictly smaller
and at most as bad.

With tasks (`MeasureConfig.tasks`), each row also carries its lm-eval scores, taken with the
first data set's measurement; the table shows each task's headline metric (`task_metric`).

With a density profile (`MeasureConfig.density_profile`), each row also gets N_hat and its
capacity density on the first data set, and N_hat's change against the base. Where either N_hat
is only a bound, the change is one too ("<" or ">"), or unknown when both bounds point the same
way.

Perplexities of models with different tokenizers are not comparable (the same text splits into
different tokens), so such a comparison is refused.
"""

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from memtool.errors import MemtoolError
from memtool.formats.bitstack_stack import is_bitstack_folder
from memtool.measurement import MeasureConfig, check_profile_tokenizer, measure
from memtool.metrics.density import load_profile
from memtool.models import load_model, load_tokenizer
from memtool.sizes import format_size, parse_size


@dataclass
class Row:
    """One measured model (at one budget, for a BitStack stack)."""

    model: str
    budget_bytes: int | None
    weight_bytes: int
    bits_per_weight: float
    bits_per_weight_linear: float
    perplexity: dict[str, float]  # by data spec
    tokens_per_s: float
    perplexity_change_pct: dict[str, float] = field(default_factory=dict)  # vs the base
    weight_bytes_ratio: float = 1.0  # vs the base
    pareto: bool = False
    # With a density profile (first data set; None otherwise):
    effective_params: float | None = None
    effective_params_bound: str | None = None  # "", ">" or "<"
    capacity_density: float | None = None
    capacity_density_interval: list[float] | None = None
    density_flags: list[str] | None = None
    effective_params_ratio: float | None = None  # N_hat / the base's; None when unknown
    effective_params_change_pct: float | None = None  # the same as a change in percent
    effective_params_change_bound: str | None = None  # "", "<" or ">" (for both)
    task_scores: dict[str, dict] | None = None  # with tasks: lm-eval's metrics per task

    @property
    def label(self) -> str:
        if self.budget_bytes is None:
            return self.model
        return f"{self.model} @ {format_size(self.budget_bytes)}"


# Row fields copied from the first data set's report (the rest are per data set or vs the base).
FROM_FIRST_REPORT = (
    "weight_bytes",
    "bits_per_weight",
    "bits_per_weight_linear",
    "tokens_per_s",
    "effective_params",
    "effective_params_bound",
    "capacity_density",
    "capacity_density_interval",
    "density_flags",
    "task_scores",
)


@dataclass
class Comparison:
    """Rows in the order measured (base first) and how they were measured."""

    rows: list[Row]
    data: list[str]
    reports: list[dict]  # every underlying `MeasureReport.to_dict()`

    def to_dict(self) -> dict:
        return {
            "data": self.data,
            "rows": [{**vars(row), "label": row.label} for row in self.rows],
            "reports": self.reports,
        }

    @property
    def has_density(self) -> bool:
        return self.rows[0].effective_params is not None

    def to_markdown(self) -> str:
        head = ["model", "weight bytes", "bits/weight (linear)", "tokens/s"]
        head += [f"ppl {d}" for d in self.data] + [f"Δ ppl {d}" for d in self.data]
        head += ["bytes vs base", "Pareto"]
        if self.has_density:
            head += ["N̂", "density (90%)", "N̂ vs base"]
        tasks = list(self.rows[0].task_scores or {})
        head += [f"{task} {task_metric(self.rows[0].task_scores[task])}" for task in tasks]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in self.rows:
            cells = [
                row.label,
                format_size(row.weight_bytes),
                f"{row.bits_per_weight_linear:.2f}",
                f"{row.tokens_per_s:.1f}",
            ]
            cells += [f"{row.perplexity[d]:.3f}" for d in self.data]
            cells += [f"{row.perplexity_change_pct[d]:+.1f}%" for d in self.data]
            cells += [f"{row.weight_bytes_ratio:.2f}x", "yes" if row.pareto else ""]
            if self.has_density:
                cells += density_cells(vars(row))
            cells += task_cells(vars(row), tasks)
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def density_cells(row: dict) -> list[str]:
    """N_hat, capacity density with its interval, and N_hat against the base's, as text."""
    bound = row["effective_params_bound"] or ""
    density = f"{bound}{row['capacity_density']:.3g}"
    if row["capacity_density_interval"]:
        low, high = row["capacity_density_interval"]
        density += f" ({low:.3g}-{high:.3g})"
    ratio = row["effective_params_ratio"]
    shown = "?" if ratio is None else f"{row['effective_params_change_bound']}{ratio:.3g}x"
    return [f"{bound}{row['effective_params']:.3g}", density, shown]


def task_metric(scores: dict) -> str:
    """The metric a table shows for a task: acc when scored, else its first number."""
    names = [k for k in scores if k != "samples" and not k.endswith("_stderr")]
    return "acc" if "acc" in names else names[0]


def task_cells(row: dict, tasks: list[str]) -> list[str]:
    cells = []
    for task in tasks:
        scores = (row["task_scores"] or {}).get(task)
        if scores is None:
            cells.append("")
            continue
        metric = task_metric(scores)
        error = scores.get(f"{metric}_stderr")
        shown = f"{scores[metric]:.3f}"
        cells.append(shown + (f" ± {error:.3f}" if isinstance(error, (int, float)) else ""))
    return cells


def bounded_ratio(value: float, bound: str, base: float, base_bound: str) -> tuple[float, str]:
    """`value` / `base` when either may be a bound ("<" or ">").

    Returns (ratio, bound of the true ratio); the ratio is nan when nothing can be said (both
    bounds the same way, or a value that is not a positive finite number)."""
    if not (0 < value < math.inf and 0 < base < math.inf):
        return math.nan, ""
    # The true ratio is at most the computed one when the value can only be lower or the base
    # only higher, at least when the reverse; both ways at once leaves it unknown.
    lower = bound == "<" or base_bound == ">"
    higher = bound == ">" or base_bound == "<"
    if lower and higher:
        return math.nan, ""
    return value / base, "<" if lower else ">" if higher else ""


def compare(
    models: list[str],
    data: list[str],
    config: MeasureConfig | None = None,
    budgets: list[int | str] | None = None,
) -> Comparison:
    """Measure `models` (the first is the base) on every spec in `data`.

    Raises:
        MemtoolError: fewer than two models, no data, differing tokenizers, or a bad model.
    """
    if len(models) < 2:
        raise MemtoolError("a comparison needs a base model and at least one variant")
    if not data:
        raise MemtoolError("--data needs at least one data set")
    config = config or MeasureConfig()
    sizes = sorted(parse_size(b) for b in budgets) if budgets else None
    rows: list[Row] = []
    reports: list[dict] = []
    # Before measuring anything: a refusal should not come after minutes of work.
    tokenizer = check_same_tokenizer(models)
    if config.density_profile is not None:
        profile = load_profile(config.density_profile)
        check_profile_tokenizer(profile, tokenizer, models[0])
    for source in models:
        stack = sizes is not None and is_bitstack_folder(Path(source).expanduser())
        loaded = load_model(
            source,
            dtype=config.dtype,
            allow_pickle=config.allow_pickle,
            budget=sizes[0] if stack else None,
        )
        for budget in sizes if stack else [None]:
            if budget is not None:
                loaded.set_budget(budget)
            # Density on the first data set only (the one a profile's protocol names).
            per_data = {
                d: measure(
                    loaded,
                    replace(
                        config,
                        data=d,
                        budget=budget,
                        density_profile=config.density_profile if d == data[0] else None,
                        tasks=config.tasks if d == data[0] else (),
                    ),
                )
                for d in data
            }
            first = per_data[data[0]]
            rows.append(
                Row(
                    model=source,
                    budget_bytes=budget,
                    perplexity={d: r.perplexity for d, r in per_data.items()},
                    **{name: getattr(first, name) for name in FROM_FIRST_REPORT},
                )
            )
            reports += [r.to_dict() for r in per_data.values()]
        del loaded
    base = rows[0]
    for row in rows:
        row.perplexity_change_pct = {
            d: 100 * (row.perplexity[d] / base.perplexity[d] - 1) for d in data
        }
        row.weight_bytes_ratio = row.weight_bytes / base.weight_bytes
        if row is base and base.effective_params is not None:
            # itself: exactly 1, even where its N-hat is only a bound
            row.effective_params_ratio, row.effective_params_change_pct = 1.0, 0.0
            row.effective_params_change_bound = ""
        elif base.effective_params is not None:
            ratio, bound = bounded_ratio(
                row.effective_params,
                row.effective_params_bound,
                base.effective_params,
                base.effective_params_bound,
            )
            if not math.isnan(ratio):
                row.effective_params_ratio = ratio
                row.effective_params_change_pct = 100 * (ratio - 1)
                row.effective_params_change_bound = bound
    for index in pareto_front([(r.weight_bytes, r.perplexity[data[0]]) for r in rows]):
        rows[index].pareto = True
    return Comparison(rows, list(data), reports)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (size, loss) that no other point dominates (smaller is better)."""
    front = []
    for i, (size, loss) in enumerate(points):
        dominated = any(
            (other_size <= size and other_loss <= loss) and (other_size < size or other_loss < loss)
            for j, (other_size, other_loss) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return front


def check_same_tokenizer(models: list[str]) -> str:
    """The models' common tokenizer fingerprint; MemtoolError naming the first that differs."""
    base_tokenizer = tokenizer_fingerprint(load_tokenizer(models[0]))
    for source in models[1:]:
        if tokenizer_fingerprint(load_tokenizer(source)) != base_tokenizer:
            raise MemtoolError(
                f"{source} does not share {models[0]}'s tokenizer: their perplexities are not "
                "comparable (the same text becomes different tokens); compare models of one family"
            )
    return base_tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the sorted vocabulary: equal for tokenizers that split text alike."""
    vocab = tokenizer.get_vocab()
    text = json.dumps(sorted(vocab.items()), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()
