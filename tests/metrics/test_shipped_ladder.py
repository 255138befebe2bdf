"""The shipped wiki ladder profile: valid, measured with the default protocol and SmolLM2's
tokenizer, and made of exactly the models its recipe trains."""

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from memtool.measurement import DEFAULT_MAX_WINDOWS, MeasureConfig
from memtool.metrics.density import effective_params, load_profile
from memtool.metrics.sizes import count_params

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
PROFILE = RECIPES / "wiki-ladder-profile.json"


def _recipe_sizes() -> list[str]:
    script = (RECIPES / "wiki-ladder.sh").read_text()
    return re.search(r"for size in ([\w ]+); do", script).group(1).split()


def test_profile_is_a_fitted_ladder_measured_with_the_default_protocol():
    profile = load_profile(PROFILE)
    assert profile.kind == "ladder" and len(profile.points) >= 5
    assert profile.points[-1][0] / profile.points[0][0] >= 20  # the span the issue asks for
    assert profile.fit is not None and len(profile.parameter_sets) >= 50
    protocol = profile.protocol
    assert protocol["data"] == "wiki" and protocol["split"] == "evaluation"
    assert protocol["seq_len"] == MeasureConfig.seq_len
    assert protocol["windows"] == DEFAULT_MAX_WINDOWS
    assert re.fullmatch(r"[0-9a-f]{64}", protocol["tokenizer"])
    # Each measured point inverts to its own size (the fit passes near every rung).
    for params, loss in profile.points:
        assert effective_params(profile, loss=loss).value == pytest.approx(params, rel=0.5)


def test_profile_points_are_the_recipes_models():
    data = json.loads(PROFILE.read_text())
    sizes = _recipe_sizes()
    assert sorted(p.stem for p in (RECIPES / "wiki-ladder").glob("*.json")) == sorted(sizes)
    counted = []
    for size in sizes:
        config = AutoConfig.from_pretrained(RECIPES / "wiki-ladder" / f"{size}.json")
        assert config.vocab_size == 49152  # SmolLM2's tokenizer
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        counted.append(count_params(model)[1])
    assert sorted(counted) == [p["params"] for p in data["points"]]
