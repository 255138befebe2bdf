"""Capacity density (Xiao et al., "Densing Law of LLMs", arXiv 2412.04315).

rho = N_hat / N: N_hat is the non-embedding parameter count a reference model would need to
match the measured model, N the measured model's non-embedding parameters. The paper publishes
no fitted constants, so memtool never invents them: the reference comes from a profile file
(`load_profile`) of one of two kinds.

- `ladder`: reference models measured with memtool's own protocol, `points` of
  {"params": N, "loss": held-out loss (mean NLL per token)}. With three or more points the loss
  curve L(N) = a * N^-alpha + E is fitted (`fit_ladder`, stored in the profile as `fit`) and
  inverted; with two, the loss is interpolated linearly in log N. N_hat outside the measured
  range is flagged "extrapolated" (fit) or reported as a bound (interpolation): never silently.
- `densing`: the paper's two steps with user-supplied constants, the loss
  L(N, D) = a * N^-alpha + b * D^-beta at the profile's D0 tokens and, for task scores, the
  sigmoid S(L) = c / (1 + exp(-gamma * (L - l))) + d. N_hat inverts both; a score outside
  (d, c + d), or a loss at or below the data term b * D0^-beta, gives a bound, not a number.

A result is (value, bound, flags): bound "" for a number, ">" or "<" when only a bound is known
(then value is that bound).

Inference-time density (`inference_time_density`) for compressed models:
rho_time = N_hat (1 + r) / (N * b/16 + N_active * r), b the effective bits per weight and r
the compute-to-memory time ratio per parameter, an explicit parameter (the paper's text and
formulas disagree on it, so reports state which r was used).
"""

import itertools
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from memtool.errors import MemtoolError

KINDS = ("ladder", "densing")
DENSING_LOSS = ("a", "alpha", "b", "beta", "D0")
DENSING_SCORE = ("c", "gamma", "l", "d")
DEFAULT_TIME_RATIO = 1.0  # r: equal compute and memory time per parameter (stated, not measured)


@dataclass(frozen=True)
class DensityProfile:
    """A validated reference profile (see the module docstring for the two kinds)."""

    kind: str
    source: str
    points: tuple[tuple[float, float], ...] = ()  # ladder: (params, loss), params ascending
    fit: dict | None = None  # ladder: {"a", "alpha", "E"}
    constants: dict = field(default_factory=dict)  # densing
    protocol: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Estimate:
    """N_hat, or a bound on it, and what to know about it."""

    value: float
    bound: str = ""  # "", ">" or "<"
    flags: tuple[str, ...] = ()


def _number(data: dict, key: str, where: str, positive: bool = False) -> float:
    if key not in data:
        raise MemtoolError(f"{where}: missing field {key!r}")
    value = data[key]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise MemtoolError(f"{where}: {key} must be a finite number, not {value!r}")
    if positive and value <= 0:
        raise MemtoolError(f"{where}: {key} must be positive, not {value}")
    return float(value)


def parse_profile(data: dict, source: str = "profile") -> DensityProfile:
    """Validate a profile's JSON object. Raises MemtoolError naming the bad or missing field."""
    if not isinstance(data, dict):
        raise MemtoolError(f"{source}: a density profile is a JSON object")
    kind = data.get("kind")
    if kind not in KINDS:
        raise MemtoolError(
            f"{source}: unknown profile kind {kind!r}; use one of {', '.join(KINDS)}"
        )
    protocol = data.get("protocol", {})
    if kind == "densing":
        raw = data.get("constants")
        if not isinstance(raw, dict):
            raise MemtoolError(f"{source}: a densing profile needs a 'constants' object")
        constants = {k: _number(raw, k, source, positive=True) for k in DENSING_LOSS}
        if all(k in raw for k in DENSING_SCORE):
            constants.update({k: _number(raw, k, source) for k in DENSING_SCORE})
            if constants["c"] <= 0 or constants["gamma"] == 0:
                raise MemtoolError(f"{source}: c must be positive and gamma non-zero")
        return DensityProfile(kind, source, constants=constants, protocol=protocol)
    raw_points = data.get("points")
    if not isinstance(raw_points, list) or len(raw_points) < 2:
        raise MemtoolError(f"{source}: a ladder profile needs at least two 'points'")
    points = sorted(
        (_number(p, "params", source, True), _number(p, "loss", source, True)) for p in raw_points
    )
    if len({n for n, _ in points}) != len(points):
        raise MemtoolError(f"{source}: two ladder points have the same params")
    if any(later >= earlier for (_, earlier), (_, later) in itertools.pairwise(points)):
        raise MemtoolError(
            f"{source}: the ladder's loss must fall as params grow (reference models of one "
            "family, trained alike); these points do not"
        )
    fit = data.get("fit")
    if fit is not None:
        fit = {k: _number(fit, k, source, positive=k != "E") for k in ("a", "alpha", "E")}
    elif len(points) >= 3:
        fit = fit_ladder(points)
    return DensityProfile(kind, source, tuple(points), fit, protocol=protocol)


def load_profile(path: Path | str) -> DensityProfile:
    """Read and validate a profile file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise MemtoolError(f"density profile {path} does not exist") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MemtoolError(f"density profile {path} is not readable JSON: {exc}") from None
    return parse_profile(data, str(path))


def fit_ladder(points: Sequence[tuple[float, float]]) -> dict:
    """Least-squares L(N) = a * N^-alpha + E: for each (alpha, E) on a grid, a is linear."""
    if len(points) < 3:
        raise MemtoolError("fitting a ladder needs at least three points")
    losses = [loss for _, loss in points]
    best = None
    for i in range(1, 200):
        alpha = i / 200  # (0, 1): the exponents measured for LMs lie well inside
        xs = [n**-alpha for n, _ in points]
        for j in range(200):
            floor = min(losses) * j / 200
            ys = [loss - floor for loss in losses]
            a = sum(x * y for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs)
            if a <= 0:
                continue
            error = sum((a * x - y) ** 2 for x, y in zip(xs, ys, strict=True))
            if best is None or error < best[0]:
                best = (error, a, alpha, floor)
    if best is None:
        raise MemtoolError("the ladder's losses do not fall with size: no power law fits")
    _, a, alpha, floor = best
    return {"a": a, "alpha": alpha, "E": floor}


def effective_params(profile: DensityProfile, loss: float | None = None, score=None) -> Estimate:
    """N_hat for a measured held-out loss (ladder, densing) or task score (densing)."""
    if profile.kind == "ladder":
        if loss is None:
            raise MemtoolError("a ladder profile needs a measured loss")
        return _ladder(profile, loss)
    return _densing(profile.constants, loss, score)


def _ladder(profile: DensityProfile, loss: float) -> Estimate:
    low_n, high_n = profile.points[0][0], profile.points[-1][0]
    if profile.fit is not None:
        a, alpha, floor = profile.fit["a"], profile.fit["alpha"], profile.fit["E"]
        if loss <= floor:
            return Estimate(high_n, ">", ("below the fitted loss floor",))
        n_hat = (a / (loss - floor)) ** (1 / alpha)
        flags = () if low_n <= n_hat <= high_n else ("extrapolated",)
        return Estimate(n_hat, "", flags)
    # Two points: linear in log N between them, a bound outside.
    (n0, l0), (n1, l1) = profile.points
    if loss >= l0:
        return Estimate(n0, "<", ("outside the ladder",))
    if loss <= l1:
        return Estimate(n1, ">", ("outside the ladder",))
    t = (l0 - loss) / (l0 - l1)
    return Estimate(math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0))))


def _densing(c: dict, loss: float | None, score: float | None) -> Estimate:
    flags: list[str] = []
    if score is not None:
        if "c" not in c:
            raise MemtoolError("this densing profile has no score constants (c, gamma, l, d)")
        low, high = c["d"], c["c"] + c["d"]
        if not low < score < high:
            # Outside the sigmoid's range: the score says only "smaller" or "larger than any".
            return Estimate(0.0 if score <= low else math.inf, "<" if score <= low else ">",
                            ("score outside the invertible range",))  # fmt: skip
        loss = c["l"] - math.log(c["c"] / (score - c["d"]) - 1) / c["gamma"]
    if loss is None:
        raise MemtoolError("a densing profile needs a loss or a task score")
    data_term = c["b"] * c["D0"] ** -c["beta"]
    if loss <= data_term:
        flags.append("loss at or below the data term")
        return Estimate(math.inf, ">", tuple(flags))
    return Estimate((c["a"] / (loss - data_term)) ** (1 / c["alpha"]), "", tuple(flags))


def capacity_density(n_hat: float, params_non_embedding: int) -> float:
    if params_non_embedding <= 0:
        raise MemtoolError("capacity density needs a positive non-embedding parameter count")
    return n_hat / params_non_embedding


def inference_time_density(
    n_hat: float,
    params: int,
    bits_per_weight: float,
    active_params: int | None = None,
    time_ratio: float = DEFAULT_TIME_RATIO,
) -> float:
    """rho_time = N_hat (1 + r) / (N * b/16 + N_active * r) (module docstring)."""
    active = params if active_params is None else active_params
    denominator = params * bits_per_weight / 16 + active * time_ratio
    if denominator <= 0:
        raise MemtoolError("inference-time density needs positive parameters and bits")
    return n_hat * (1 + time_ratio) / denominator


def bootstrap_density(
    profile: DensityProfile,
    window_nll_sums: Sequence[float],
    tokens_per_window: int | Sequence[int],
    params_non_embedding: int,
    samples: int = 1000,
    seed: int = 0,
) -> tuple[float, tuple[float, float], tuple[str, ...]]:
    """Median and 90% interval of rho over windows resampled with replacement.

    `tokens_per_window` is one count for every window or one per window (forward batches of
    unequal size). Quantiles are taken of log rho (density spans orders of magnitude). Resamples
    whose N_hat is only a bound are kept at the bound and flagged ("interval includes bounds").
    """
    n = len(window_nll_sums)
    tokens = [tokens_per_window] * n if isinstance(tokens_per_window, int) else tokens_per_window
    if not window_nll_sums or len(tokens) != n or min(tokens) <= 0:
        raise MemtoolError("bootstrapping density needs per-window losses and token counts")
    rng = random.Random(seed)
    logs, bounded = [], False
    for _ in range(samples):
        picks = [rng.randrange(n) for _ in range(n)]
        total = sum(window_nll_sums[i] for i in picks)
        estimate = effective_params(profile, loss=total / sum(tokens[i] for i in picks))
        bounded |= bool(estimate.bound)
        if 0 < estimate.value < math.inf:
            logs.append(math.log(capacity_density(estimate.value, params_non_embedding)))
    if not logs:
        raise MemtoolError("every bootstrap sample fell outside the profile's range")
    logs.sort()

    def quantile(q: float) -> float:
        return math.exp(logs[min(len(logs) - 1, int(q * len(logs)))])

    flags = ("interval includes bounds",) if bounded else ()
    return quantile(0.5), (quantile(0.05), quantile(0.95)), flags


def build_ladder_profile(points: Sequence[tuple[int, float]], protocol: dict) -> dict:
    """A ladder profile's JSON object from measured (non-embedding params, loss) pairs; the
    protocol (data, split, seq_len, windows, fingerprint) travels with it, so a later
    measurement can tell whether it was measured the same way."""
    data = {
        "kind": "ladder",
        "points": [{"params": int(n), "loss": float(loss)} for n, loss in sorted(points)],
        "protocol": protocol,
    }
    profile = parse_profile(data, "the measured ladder")  # validates, fits with >= 3 points
    if profile.fit is not None:
        data["fit"] = profile.fit
    return data


def protocol_flags(profile: DensityProfile, measured: dict) -> tuple[str, ...]:
    """Flags for protocol fields the profile states and the measurement does differently."""
    differing = [
        key
        for key in ("data", "split", "seq_len", "fingerprint")
        if key in profile.protocol and key in measured and profile.protocol[key] != measured[key]
    ]
    return (f"protocol differs from the profile's ({', '.join(differing)})",) if differing else ()
