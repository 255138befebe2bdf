"""Capacity density: profiles validated, N_hat inverted (or bounded), rho and its interval."""

import json
import math

import pytest

from memtool.errors import MemtoolError
from memtool.metrics.density import (
    bootstrap_density,
    capacity_density,
    effective_params,
    fit_ladder,
    inference_time_density,
    load_profile,
    parse_profile,
)

A, ALPHA, E = 40.0, 0.3, 2.0
SIZES = [1e6, 2e6, 4e6, 8e6, 16e6, 20e6]


def _loss(n: float) -> float:
    return A * n**-ALPHA + E


def _ladder(sizes=SIZES, **extra):
    return parse_profile({"kind": "ladder", "points": [{"params": n, "loss": _loss(n)}
                                                       for n in sizes], **extra})  # fmt: skip


def test_ladder_fit_recovers_the_power_law_and_inverts_it():
    fit = fit_ladder([(n, _loss(n)) for n in SIZES])
    assert fit["alpha"] == pytest.approx(ALPHA, abs=0.01)
    assert fit["E"] == pytest.approx(E, abs=0.05)
    profile = _ladder()
    for n in (1.5e6, 5e6, 12e6):
        estimate = effective_params(profile, loss=_loss(n))
        assert estimate.bound == "" and estimate.flags == ()
        assert estimate.value == pytest.approx(n, rel=0.05)
    beyond = effective_params(profile, loss=_loss(60e6))
    assert "extrapolated" in beyond.flags and beyond.value > 20e6
    floor = effective_params(profile, loss=E - 0.1)
    assert floor.bound == ">" and floor.value == 20e6


def test_two_point_ladder_interpolates_in_log_size_and_bounds_outside():
    profile = _ladder([1e6, 16e6])
    middle = effective_params(profile, loss=(_loss(1e6) + _loss(16e6)) / 2)
    assert middle.value == pytest.approx(4e6) and middle.bound == ""
    assert effective_params(profile, loss=_loss(0.5e6)).bound == "<"
    assert effective_params(profile, loss=_loss(40e6)).bound == ">"


DENSING = {"a": 400.0, "alpha": 0.34, "b": 410.0, "beta": 0.28, "D0": 1e12,
           "c": 0.6, "gamma": -3.0, "l": 2.5, "d": 0.25}  # fmt: skip


def test_densing_inverts_loss_and_score():
    profile = parse_profile({"kind": "densing", "constants": DENSING})
    c = DENSING
    n = 3e9
    loss = c["a"] * n ** -c["alpha"] + c["b"] * c["D0"] ** -c["beta"]
    assert effective_params(profile, loss=loss).value == pytest.approx(n, rel=1e-9)
    score = c["c"] / (1 + math.exp(-c["gamma"] * (loss - c["l"]))) + c["d"]
    assert effective_params(profile, score=score).value == pytest.approx(n, rel=1e-6)
    assert effective_params(profile, score=c["d"] - 0.01).bound == "<"
    assert effective_params(profile, score=c["c"] + c["d"]).bound == ">"
    assert effective_params(profile, loss=0.1).bound == ">"  # below the data term


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"kind": "chinchilla"}, "unknown profile kind"),
        ({"kind": "ladder", "points": [{"params": 1e6, "loss": 3.0}]}, "at least two"),
        ({"kind": "ladder", "points": [{"params": 1e6}, {"params": 2e6, "loss": 3}]}, "'loss'"),
        (
            {"kind": "ladder", "points": [{"params": -1, "loss": 3}, {"params": 2, "loss": 2}]},
            "positive",
        ),
        ({"kind": "densing", "constants": {"a": 1, "alpha": 0.3}}, "missing field 'b'"),
        ({"kind": "densing", "constants": {**DENSING, "alpha": "x"}}, "finite number"),
        ({"kind": "densing"}, "'constants'"),
    ],
)
def test_bad_profiles_are_refused_with_the_field_named(data, words):
    with pytest.raises(MemtoolError, match=words):
        parse_profile(data)


def test_profile_files(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"kind": "ladder", "points": [
        {"params": n, "loss": _loss(n)} for n in SIZES]}))  # fmt: skip
    assert load_profile(path).fit is not None
    with pytest.raises(MemtoolError, match="does not exist"):
        load_profile(tmp_path / "missing.json")
    path.write_text("{not json")
    with pytest.raises(MemtoolError, match="not readable JSON"):
        load_profile(path)


def test_density_and_inference_time_density():
    assert capacity_density(2e6, 4e6) == 0.5
    # 16-bit weights, every parameter active, r = 1: the time density is the plain density.
    assert inference_time_density(2e6, 4e6, 16.0) == pytest.approx(0.5)
    # 4-bit weights move a quarter of the bytes: denser per unit of inference time.
    assert inference_time_density(2e6, 4e6, 4.0) > 0.5
    with pytest.raises(MemtoolError):
        capacity_density(1.0, 0)


def test_bootstrap_interval_contains_the_point_and_narrows_with_more_windows():
    profile = _ladder()
    n_true, params, tokens = 5e6, 10_000_000, 511
    loss = _loss(n_true)

    def windows(count: int) -> list[float]:
        # Deterministic spread around the true loss: +-0.2 nats per token.
        return [(loss + 0.2 * math.sin(i * 1.7)) * tokens for i in range(count)]

    median, (low, high), flags = bootstrap_density(profile, windows(16), tokens, params)
    assert low < median < high and flags == ()
    assert median == pytest.approx(n_true / params, rel=0.1)
    _, (low64, high64), _ = bootstrap_density(profile, windows(64), tokens, params)
    assert high64 / low64 < high / low
    again = bootstrap_density(profile, windows(16), tokens, params)
    assert again == (median, (low, high), flags)  # seeded


def test_parameter_sets_widen_the_interval_and_are_validated():
    n_true, params, tokens = 5e6, 10_000_000, 511
    sums = [(_loss(n_true) + 0.05 * math.sin(i * 1.7)) * tokens for i in range(16)]
    plain = _ladder()
    _, (low, high), _ = bootstrap_density(plain, sums, tokens, params)
    fit = fit_ladder([(n, _loss(n)) for n in SIZES])
    # The reference itself uncertain: its loss floor anywhere in +-0.1 nats.
    sets = [{**fit, "E": fit["E"] + shift} for shift in (-0.1, -0.05, 0.0, 0.05, 0.1)]
    uncertain = _ladder(fit=fit, parameter_sets=sets)
    median, (low_sets, high_sets), _ = bootstrap_density(uncertain, sums, tokens, params)
    assert low_sets < low and high_sets > high
    assert median == pytest.approx(n_true / params, rel=0.15)
    for bad, words in (
        ({"parameter_sets": [{"a": 1.0, "alpha": 0.3}]}, "missing field 'E'"),
        ({"parameter_sets": {"a": 1.0}}, "list of objects"),
        ({"parameter_sets": [{"a": 1.0, "alpha": 0.3, "E": -1.0}]}, "must not be negative"),
    ):
        with pytest.raises(MemtoolError, match=words):
            _ladder(**bad)
    with pytest.raises(MemtoolError, match="same constants"):
        parse_profile({"kind": "densing", "constants": DENSING,
                       "parameter_sets": [{k: DENSING[k] for k in ("a", "alpha", "b", "beta",
                                                                     "D0")}]})  # fmt: skip
    densing = parse_profile({"kind": "densing", "constants": DENSING,
                             "parameter_sets": [DENSING, {**DENSING, "a": 440.0}]})  # fmt: skip
    assert len(densing.parameter_sets) == 2
    assert densing.with_parameters(densing.parameter_sets[1]).constants["a"] == 440.0


def test_ladder_parameter_sets_refit_resampled_windows():
    from memtool.metrics.density import ladder_parameter_sets

    tokens = [100] * 8
    windows = [([(_loss(n) + 0.02 * math.cos(i + n)) * 100 for i in range(8)], tokens)
               for n in SIZES]  # fmt: skip
    sets = ladder_parameter_sets(SIZES, windows, samples=20)
    assert 10 <= len(sets) <= 20  # resamples that stop falling with size are dropped
    assert all(s["alpha"] == pytest.approx(ALPHA, abs=0.1) for s in sets)
    assert len({round(s["a"], 6) for s in sets}) > 1  # the fits do differ


@pytest.mark.parametrize(
    ("value", "bound", "base", "base_bound", "ratio", "shown"),
    [
        (50.0, "", 100.0, "", 0.5, ""),
        (50.0, "", 100.0, ">", 0.5, "<"),  # the base may be larger: N_hat at most halved
        (50.0, "", 100.0, "<", 0.5, ">"),
        (50.0, ">", 100.0, "", 0.5, ">"),
        (50.0, "<", 100.0, ">", 0.5, "<"),
        (50.0, ">", 100.0, ">", None, ""),  # both only bounds, the same way: nothing known
        (math.inf, ">", 100.0, "", None, ""),
    ],
)
def test_n_hat_against_the_base_carries_the_bounds(value, bound, base, base_bound, ratio, shown):
    from memtool.comparison import bounded_ratio

    got, direction = bounded_ratio(value, bound, base, base_bound)
    if ratio is None:
        assert math.isnan(got)
    else:
        assert got == pytest.approx(ratio) and direction == shown


def test_a_built_ladder_profile_keeps_its_parameter_sets():
    from memtool.metrics.density import build_ladder_profile

    points = [(n, _loss(n)) for n in SIZES]
    fit = fit_ladder(points)
    data = build_ladder_profile(points, {"data": "wiki"}, [fit, {**fit, "E": 1.9}])
    profile = parse_profile(json.loads(json.dumps(data)))
    assert profile.fit == pytest.approx(fit) and len(profile.parameter_sets) == 2
    assert "parameter_sets" not in build_ladder_profile(points[:2], {}, [fit])  # no fit, no sets


def test_a_densing_task_score_takes_its_interval_from_the_parameter_sets():
    from memtool.measurement import profile_score
    from memtool.metrics.density import parameter_set_density

    sets = [{**DENSING, "a": a} for a in (360.0, 400.0, 440.0)]
    profile = parse_profile({"kind": "densing", "constants": DENSING, "parameter_sets": sets,
                             "protocol": {"task": "arc", "metric": "acc_norm"}})  # fmt: skip
    score = 0.5
    median, (low, high), flags = parameter_set_density(profile, 1e9, score=score)
    point = effective_params(profile, score=score).value / 1e9
    assert low < median < high and median == pytest.approx(point) and flags == ()
    assert profile_score(profile, {"arc": {"acc": 0.4, "acc_norm": score}}) == score
    assert profile_score(profile, {"other": {"acc": 0.4}}) is None  # not scored: loss is used
    with pytest.raises(MemtoolError, match="did not report"):
        profile_score(profile, {"arc": {"acc": 0.4}})
    with pytest.raises(MemtoolError, match="no parameter_sets"):
        parameter_set_density(parse_profile({"kind": "densing", "constants": DENSING}), 1e9, 3.0)
