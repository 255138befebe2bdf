"""Recipes: every shipped recipe validates; bad recipes fail naming the key; a recipe runs."""

import json
from pathlib import Path

import pytest

from memtool.compress import BitStackConfig, BnbConfig, GPTQConfig
from memtool.errors import MemtoolError
from memtool.recipes import load_recipe, run_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.*ml"))


def test_recipes_folder_is_not_empty():
    assert len(RECIPES) >= 3


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.output and recipe.compress.method


def test_shipped_gptq_recipe_contents():
    recipe = load_recipe(Path(__file__).parent.parent / "recipes" / "smollm2-gptq-4bit.toml")
    assert recipe.compress == GPTQConfig(bits=4, group_size=128, sym=True, act_order=True)
    assert recipe.calibration.n_samples == 128 and recipe.measure.data == ["wiki", "code"]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('output = "x"\n[compress]\nmethod = "gptq"\nbitz = 4\n', "unknown key.*bitz"),
        ('output = "x"\n[compress]\nmethod = "gptq"\nbits = "four"\n', "bits must be int"),
        ('output = "x"\n[compress]\nmethod = "gptq"\nbits = 5\n', "--bits 5"),
        ('output = "x"\n[compress]\nmethod = "magic"\n', "method must be one of"),
        ('[compress]\nmethod = "rtn"\n', "'output'"),
        ('output = "x"\nextra = 1\n[compress]\nmethod = "rtn"\n', "unknown top-level"),
        (
            'output = "x"\n[compress]\nmethod = "rtn"\n[calibration]\nn_samples = 0\n',
            "--calib-samples",
        ),
        ("output = [\n", "not valid TOML"),
        (
            'output = "x"\n[compress]\nmethod = "gptq"\ntrue_sequential = "yes"\n',
            "true_sequential must be true or false",
        ),
        (
            'output = "x"\n[compress]\nmethod = "gptq"\n[measure]\nbudget = "1MB"\n',
            "budget applies to method",
        ),
        (
            'output = "x"\n[compress]\nmethod = "bitstack"\n[measure]\nbudget = "lots"\n',
            "size",
        ),
        ('output = "x"\n[compress]\nmethod = "rtn"\n[measure]\ntasks = 3\n', "tasks must be"),
        (
            'output = "x"\n[compress]\nmethod = "rtn"\n[measure]\ndensity_profile = "no.json"\n',
            "does not exist",
        ),
    ],
)
def test_bad_recipes_name_the_problem(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(MemtoolError, match=match):
        load_recipe(path)


def test_yaml_and_bnb(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("output: o\ncompress:\n  method: int8\n")
    assert load_recipe(path).compress == BnbConfig("int8")


def test_recipe_runs_and_gates(tiny_llama_dir, text_file, tmp_path):
    path = tmp_path / "r.toml"
    out = tmp_path / "out"
    profile = tmp_path / "ladder.json"
    points = [{"params": n, "loss": 2.0 + 40.0 * n**-0.15} for n in (1e4, 1e5, 1e6, 1e7)]
    profile.write_text(json.dumps({"kind": "ladder", "points": points}))
    path.write_text(
        f'model = "{tiny_llama_dir}"\noutput = "{out}"\n'
        '[compress]\nmethod = "gptq"\nbits = 4\ngroup_size = 32\n'
        f'[calibration]\ndata = "{text_file}"\nn_samples = 4\nseq_len = 32\n'
        f'[measure]\ndata = "{text_file}"\nmax_windows = 2\nseq_len = 32\nmax_perplexity = 1.0\n'
        f'density_profile = "{profile}"\nmin_density = 1e9\n'
    )
    summary, failures = run_recipe(load_recipe(path))
    assert (out / "config.json").exists()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 4
    report = next(iter(summary["measure"].values()))
    assert report["bits_per_weight_linear"] < 8 and report["capacity_density"] > 0
    assert len(failures) == 2 and any("max-perplexity" in f for f in failures)
    assert any("below --min-density" in f for f in failures)
    path.write_text(path.read_text().replace(f'density_profile = "{profile}"\n', ""))
    with pytest.raises(MemtoolError, match="min_density needs density_profile"):
        load_recipe(path)


def test_bitstack_recipe_measures_the_stack_at_its_budget(tiny_llama_dir, text_file, tmp_path):
    from memtool.compress import CalibrationConfig, compress
    from memtool.formats.bitstack_stack import StackFile

    config = BitStackConfig(niter=3, score_samples=2)
    calibration = CalibrationConfig(data=str(text_file), n_samples=4, seq_len=32)
    compress(tiny_llama_dir, config, calibration, output=tmp_path / "probe", show_progress=False)
    probe = StackFile(tmp_path / "probe")  # the recipe writes the same stack: same sizes
    budget = (probe.min_bytes + probe.max_bytes) // 2
    path = tmp_path / "r.toml"
    out = tmp_path / "stack"
    path.write_text(
        f'model = "{tiny_llama_dir}"\noutput = "{out}"\n'
        '[compress]\nmethod = "bitstack"\nniter = 3\nscore_samples = 2\n'
        f'[calibration]\ndata = "{text_file}"\nn_samples = 4\nseq_len = 32\n'
        f'[measure]\ndata = "{text_file}"\nmax_windows = 1\nseq_len = 32\nbudget = "{budget}"\n'
    )
    recipe = load_recipe(path)
    assert recipe.compress == config
    summary, failures = run_recipe(recipe)
    report = next(iter(summary["measure"].values()))
    assert report["budget_bytes"] == budget
    assert report["weight_bytes"] == max(b for b in probe.weight_bytes if b <= budget)
    assert failures == []
