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

Either kind may carry `parameter_sets`: alternative constants (densing) or fits {a, alpha, E}
(ladder) that express the reference's own uncertainty, such as fits to bootstrap resamples of
the ladder's evaluation windows (`ladder_parameter_sets`). The density bootstrap then draws one
set per resample as well as resampling the measured windows.

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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

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
    parameter_sets: tuple[dict, ...] = ()  # alternative constants (densing) or fits (ladder)

    def with_parameters(self, parameters: dict) -> "DensityProfile":
        """This profile with one of its parameter sets in place of its constants or fit."""
        if self.kind == "densing":
            return replace(self, constants=parameters, parameter_sets=())
        return replace(self, fit=parameters, parameter_sets=())


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
    raw_sets = data.get("parameter_sets", [])
    if not isinstance(raw_sets, list) or not all(isinstance(p, dict) for p in raw_sets):
        raise MemtoolError(f"{source}: parameter_sets must be a list of objects")
    if kind == "densing":
        raw = data.get("constants")
        if not isinstance(raw, dict):
            raise MemtoolError(f"{source}: a densing profile needs a 'constants' object")
        constants = _densing_constants(raw, source)
        sets = []
        for i, raw_set in enumerate(raw_sets):
            parameters = _densing_constants(raw_set, f"{source}: parameter_sets[{i}]")
            if parameters.keys() != constants.keys():
                raise MemtoolError(
                    f"{source}: parameter_sets[{i}] must give the same constants as 'constants'"
                )
            sets.append(parameters)
        return DensityProfile(
            kind, source, constants=constants, protocol=protocol, parameter_sets=tuple(sets)
        )
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
        fit = _ladder_fit(fit, source)
    elif len(points) >= 3:
        fit = fit_ladder(points)
    if raw_sets and fit is None:
        raise MemtoolError(f"{source}: parameter_sets of a ladder are fits: give 'fit' too")
    sets = tuple(_ladder_fit(p, f"{source}: parameter_sets[{i}]") for i, p in enumerate(raw_sets))
    return DensityProfile(kind, source, tuple(points), fit, protocol=protocol, parameter_sets=sets)


def _densing_constants(raw: dict, where: str) -> dict:
    constants = {k: _number(raw, k, where, positive=True) for k in DENSING_LOSS}
    if all(k in raw for k in DENSING_SCORE):
        constants.update({k: _number(raw, k, where) for k in DENSING_SCORE})
        if constants["c"] <= 0 or constants["gamma"] == 0:
            raise MemtoolError(f"{where}: c must be positive and gamma non-zero")
    return constants


def _ladder_fit(raw: dict, where: str) -> dict:
    if not isinstance(raw, dict):
        raise MemtoolError(f"{where}: a ladder fit is an object with a, alpha and E")
    fit = {k: _number(raw, k, where, positive=k != "E") for k in ("a", "alpha", "E")}
    if fit["E"] < 0:
        raise MemtoolError(f"{where}: the loss floor E must not be negative, not {fit['E']}")
    return fit


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
    """Least-squares L(N) = a * N^-alpha + E over a grid of (alpha, E); a is linear, so for
    each grid cell it is solved exactly (the whole grid at once, as tensors)."""
    if len(points) < 3:
        raise MemtoolError("fitting a ladder needs at least three points")
    params = torch.tensor([n for n, _ in points], dtype=torch.float64)
    losses = torch.tensor([loss for _, loss in points], dtype=torch.float64)
    # alpha in (0, 1): the exponents measured for LMs lie well inside; E in [0, min loss).
    alphas = torch.arange(1, 200, dtype=torch.float64) / 200
    floors = losses.min() * torch.arange(200, dtype=torch.float64) / 200
    xs = params[None, :] ** -alphas[:, None]  # [alpha, point]
    ys = losses[None, :] - floors[:, None]  # [floor, point]
    sxx = (xs * xs).sum(1)[:, None]
    sxy = xs @ ys.T  # [alpha, floor]
    syy = (ys * ys).sum(1)[None, :]
    a = sxy / sxx
    error = a * a * sxx - 2 * a * sxy + syy
    error = torch.where(a > 0, error, torch.inf)
    best = int(torch.argmin(error))
    if not math.isfinite(float(error.flatten()[best])):
        raise MemtoolError("the ladder's losses do not fall with size: no power law fits")
    i, j = divmod(best, len(floors))
    return {"a": float(a[i, j]), "alpha": float(alphas[i]), "E": float(floors[j])}


def ladder_parameter_sets(
    params: Sequence[int],
    window_losses: Sequence[tuple[Sequence[float], Sequence[int]]],
    samples: int = 100,
    seed: int = 0,
) -> list[dict]:
    """Fits of the ladder to bootstrap resamples of each reference model's evaluation windows.

    `window_losses[k]` holds model k's per-window NLL sums and predicted-token counts. A resample
    whose losses no longer fall with size is skipped (it is not a ladder).
    """
    rng = random.Random(seed)
    sets = []
    for _ in range(samples):
        points = []
        for n, (sums, tokens) in zip(params, window_losses, strict=True):
            picks = [rng.randrange(len(sums)) for _ in sums]
            points.append((n, sum(sums[i] for i in picks) / sum(tokens[i] for i in picks)))
        points.sort()
        if all(b[1] < a[1] for a, b in itertools.pairwise(points)):
            sets.append(fit_ladder(points))
    return sets


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
    """Median and 90% interval of rho over windows resampled with replacement (and, when the
    profile has `parameter_sets`, one set drawn per resample).

    `tokens_per_window` is one count for every window or one per window (forward batches of
    unequal size). Quantiles are taken of log rho (density spans orders of magnitude). Resamples
    whose N_hat is only a bound are kept at the bound and flagged ("interval includes bounds").
    """
    n = len(window_nll_sums)
    tokens = [tokens_per_window] * n if isinstance(tokens_per_window, int) else tokens_per_window
    if not window_nll_sums or len(tokens) != n or min(tokens) <= 0:
        raise MemtoolError("bootstrapping density needs per-window losses and token counts")
    rng = random.Random(seed)

    def estimates():
        for _ in range(samples):
            picks = [rng.randrange(n) for _ in range(n)]
            total = sum(window_nll_sums[i] for i in picks)
            reference = profile
            if profile.parameter_sets:
                reference = profile.with_parameters(rng.choice(profile.parameter_sets))
            yield effective_params(reference, loss=total / sum(tokens[i] for i in picks))

    return _median_and_interval(
        estimates(), params_non_embedding, "every bootstrap sample fell outside the profile's range"
    )


def parameter_set_density(
    profile: DensityProfile,
    params_non_embedding: int,
    loss: float | None = None,
    score: float | None = None,
) -> tuple[float, tuple[float, float], tuple[str, ...]]:
    """Median and 90% interval of rho over the profile's parameter sets, for one measured loss
    or score (a task score has no windows to resample). Same conventions as `bootstrap_density`."""
    if not profile.parameter_sets:
        raise MemtoolError(f"{profile.source} has no parameter_sets to take an interval over")
    estimates = (
        effective_params(profile.with_parameters(parameters), loss=loss, score=score)
        for parameters in profile.parameter_sets
    )
    return _median_and_interval(
        estimates, params_non_embedding, "every parameter set put the measurement outside its range"
    )


def _median_and_interval(
    estimates: Iterable[Estimate], params_non_embedding: int, empty: str
) -> tuple[float, tuple[float, float], tuple[str, ...]]:
    """Median and 5%-95% quantiles of log density over `estimates`, back on the density scale;
    a bound is kept at its value and flagged, an infinite or zero one dropped."""
    logs, bounded = [], False
    for estimate in estimates:
        bounded |= bool(estimate.bound)
        if 0 < estimate.value < math.inf:
            logs.append(math.log(capacity_density(estimate.value, params_non_embedding)))
    if not logs:
        raise MemtoolError(empty)
    logs.sort()

    def quantile(q: float) -> float:
        return math.exp(logs[min(len(logs) - 1, int(q * len(logs)))])

    flags = ("interval includes bounds",) if bounded else ()
    return quantile(0.5), (quantile(0.05), quantile(0.95)), flags


def build_ladder_profile(
    points: Sequence[tuple[int, float]], protocol: dict, parameter_sets: Sequence[dict] = ()
) -> dict:
    """A ladder profile's JSON object from measured (non-embedding params, loss) pairs; the
    protocol (data, split, seq_len, windows, fingerprint) travels with it, so a later
    measurement can tell whether it was measured the same way. `parameter_sets` (fits to
    resampled windows, `ladder_parameter_sets`) are kept when there is a fit."""
    data = {
        "kind": "ladder",
        "points": [{"params": int(n), "loss": float(loss)} for n, loss in sorted(points)],
        "protocol": protocol,
    }
    profile = parse_profile(data, "the measured ladder")  # validates, fits with >= 3 points
    if profile.fit is not None:
        data["fit"] = profile.fit
        if parameter_sets:
            data["parameter_sets"] = list(parameter_sets)
    return data


def protocol_flags(profile: DensityProfile, measured: dict) -> tuple[str, ...]:
    """Flags for protocol fields the profile states and the measurement does differently."""
    differing = [
        key
        for key in ("data", "split", "seq_len", "fingerprint")
        if key in profile.protocol and key in measured and profile.protocol[key] != measured[key]
    ]
    return (f"protocol differs from the profile's ({', '.join(differing)})",) if differing else ()
