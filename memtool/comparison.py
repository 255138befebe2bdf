"""`compare`: one table for a base model and its variants (`memtool measure BASE V1 V2 ...`).

Every model is measured with the same `MeasureConfig` on every data set; BitStack stacks are
measured at each of `budgets` (one loaded model resized in place), so they show as a curve.
Each row gets its change against the base (the first model, or the first budget of a stack
given first) and whether it lies on the Pareto frontier of weight bytes against perplexity on
the first data set: no other row is at most as large and strictly better, or strictly smaller
and at most as bad.

Perplexities of models with different tokenizers are not comparable (the same text splits into
different tokens), so such a comparison is refused.
"""

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from memtool.errors import MemtoolError
from memtool.formats.bitstack_stack import is_bitstack_folder
from memtool.measurement import MeasureConfig, measure
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

    @property
    def label(self) -> str:
        if self.budget_bytes is None:
            return self.model
        return f"{self.model} @ {format_size(self.budget_bytes)}"


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

    def to_markdown(self) -> str:
        head = ["model", "weight bytes", "bits/weight (linear)", "tokens/s"]
        head += [f"ppl {d}" for d in self.data] + [f"Δ ppl {d}" for d in self.data]
        head += ["bytes vs base", "Pareto"]
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
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


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
    check_same_tokenizer(models)
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
            per_data = {d: measure(loaded, replace(config, data=d, budget=budget)) for d in data}
            first = per_data[data[0]]
            rows.append(
                Row(
                    model=source,
                    budget_bytes=budget,
                    weight_bytes=first.weight_bytes,
                    bits_per_weight=first.bits_per_weight,
                    bits_per_weight_linear=first.bits_per_weight_linear,
                    perplexity={d: r.perplexity for d, r in per_data.items()},
                    tokens_per_s=first.tokens_per_s,
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
