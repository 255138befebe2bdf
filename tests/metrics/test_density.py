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
