"""Recipes: a compression pipeline described in a TOML or YAML file, validated on load.

A recipe names the model, the output folder, the method with its settings, the calibration data
and, optionally, what to measure afterwards with CI gates:

    model = "smollm2-135m"
    output = "out/smollm2-gptq-4bit"

    [compress]
    method = "gptq"          # gptq | awq | rtn | nf4 | fp4 | int8 | bitstack
    bits = 4
    group_size = 128

    [calibration]
    data = "wiki"
    n_samples = 128

    [measure]                # optional
    data = ["wiki", "code"]
    max_windows = 32
    max_perplexity = 30.0
    budget = "150MB"         # BitStack only: load the stack at this budget to measure
    density_profile = "recipes/wiki-ladder-profile.json"   # density on the first data set
    min_density = 0.001      # needs density_profile
    tasks = ["tasks/arc.jsonl"]   # lm-eval task accuracy (needs the eval extra)

Unknown keys, wrong types and impossible values are errors that name the key, before any work.
"""

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from memtool.compress import (
    AWQConfig,
    BitStackConfig,
    BnbConfig,
    CalibrationConfig,
    GPTQConfig,
    RTNConfig,
)
from memtool.errors import MemtoolError
from memtool.sizes import parse_size

METHOD_CONFIGS = {
    "rtn": RTNConfig,
    "gptq": GPTQConfig,
    "awq": AWQConfig,
    "bitstack": BitStackConfig,
}
BNB_METHODS = ("nf4", "fp4", "int8")


@dataclass
class MeasureStep:
    data: list[str] = field(default_factory=lambda: ["wiki"])
    max_windows: int = 32
    seq_len: int = 512
    max_perplexity: float | None = None
    budget: str | None = None  # BitStack stacks: measure at this budget ("150MB")
    density_profile: str | None = None  # capacity density on the first data set
    min_density: float | None = None
    tasks: list[str] = field(default_factory=list)  # lm-eval tasks, scored once


@dataclass
class Recipe:
    path: Path
    model: str | None
    output: str
    compress: RTNConfig | GPTQConfig | AWQConfig | BnbConfig | BitStackConfig
    calibration: CalibrationConfig
    measure: MeasureStep | None


def _read(path: Path) -> dict:
    if not path.is_file():
        raise MemtoolError(f"recipe {path} does not exist")
    text = path.read_text()
    if path.suffix == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise MemtoolError(f"recipe {path} is not valid TOML: {exc}") from exc
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise MemtoolError(f"recipe {path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise MemtoolError(f"recipe {path} must be a mapping at the top level")
        return loaded
    raise MemtoolError(f"recipe {path}: use a .toml, .yaml or .yml file")


def _build(kind: type, table: dict, where: str):
    """Instantiate dataclass `kind` from `table`, naming unknown keys and wrong types."""
    if not isinstance(table, dict):
        raise MemtoolError(f"{where} must be a table of settings")
    fields = {f.name: f for f in dataclasses.fields(kind)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise MemtoolError(
            f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(fields)}"
        )
    for key, value in table.items():
        default = getattr(kind, key, None) if not callable(getattr(kind, key, None)) else None
        expected = type(default) if default is not None else None
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            table[key] = float(value)
        elif expected is not None and not isinstance(value, expected):
            raise MemtoolError(
                f"{where}.{key} must be {expected.__name__}, got {type(value).__name__} {value!r}"
            )
    return kind(**table)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe (TOML or YAML).

    Raises:
        MemtoolError: the file is missing, unreadable, or names an unknown key or bad value.
    """
    path = Path(path)
    raw = dict(_read(path))
    where = str(path)
    known = {"model", "output", "compress", "calibration", "measure"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise MemtoolError(f"{where}: unknown top-level key(s) {', '.join(unknown)}")
    if not isinstance(raw.get("output"), str):
        raise MemtoolError(f"{where}: 'output' (the folder to write) is required")
    settings = dict(raw.get("compress") or {})
    method = settings.pop("method", None)
    if method in BNB_METHODS:
        config = _build(BnbConfig, {"quant_type": method, **settings}, f"{where} [compress]")
    elif method in METHOD_CONFIGS:
        config = _build(METHOD_CONFIGS[method], settings, f"{where} [compress]")
    else:
        names = ", ".join([*METHOD_CONFIGS, *BNB_METHODS])
        raise MemtoolError(f"{where} [compress]: method must be one of {names}, got {method!r}")
    config.validate()
    calibration = _build(
        CalibrationConfig, dict(raw.get("calibration") or {}), f"{where} [calibration]"
    )
    calibration.validate()
    measure = None
    if "measure" in raw:
        table = dict(raw["measure"] or {})
        for key in ("data", "tasks"):
            if isinstance(table.get(key), str):
                table[key] = [table[key]]
        measure = _build(MeasureStep, table, f"{where} [measure]")
        for key in ("data", "tasks"):
            value = getattr(measure, key)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise MemtoolError(f"{where} [measure]: {key} must be a string or a list of them")
        if measure.min_density is not None and measure.density_profile is None:
            raise MemtoolError(f"{where} [measure]: min_density needs density_profile")
        if measure.density_profile is not None:
            from memtool.metrics.density import load_profile

            load_profile(measure.density_profile)  # a bad profile fails now, not after compress
        if measure.tasks:
            from memtool.metrics.tasks import resolve_tasks

            resolve_tasks(measure.tasks)
        if measure.max_windows <= 0 or measure.seq_len <= 1:
            raise MemtoolError(f"{where} [measure]: max_windows and seq_len must be positive")
        if measure.budget is not None:
            if not isinstance(config, BitStackConfig):
                raise MemtoolError(f'{where} [measure]: budget applies to method = "bitstack"')
            parse_size(measure.budget)  # a bad size fails now, not after the compression
    model = raw.get("model")
    if model is not None and not isinstance(model, str):
        raise MemtoolError(f"{where}: 'model' must be a string")
    return Recipe(path, model, raw["output"], config, calibration, measure)


def run_recipe(
    recipe: Recipe, output: str | None = None, overwrite: bool = False
) -> tuple[dict, list[str]]:
    """Compress as the recipe says, then measure the written checkpoint if asked.

    Args:
        recipe: a validated recipe.
        output: overrides the recipe's output folder (relative paths are relative to the
            current directory, not to the recipe).
        overwrite: replace an existing output folder.

    Returns:
        (a JSON-ready summary, the CI gates that failed).
    """
    from memtool.compress import compress
    from memtool.measurement import MeasureConfig, measure, threshold_failures
    from memtool.models import load_model

    target = output or recipe.output
    result, _, _ = compress(
        recipe.model,
        recipe.compress,
        recipe.calibration,
        output=target,
        overwrite=overwrite,
        keep_model=False,
    )
    summary = {"recipe": str(recipe.path), "compress": result.to_dict(), "measure": {}}
    failures: list[str] = []
    if recipe.measure is not None:
        step = recipe.measure
        written = load_model(target, budget=step.budget)  # what ships, not what is in memory
        for data in step.data:
            first = data == step.data[0]  # density and tasks once, with the first data set
            config = MeasureConfig(
                data=data,
                seq_len=step.seq_len,
                max_windows=step.max_windows,
                budget=step.budget,
                density_profile=step.density_profile if first else None,
                tasks=tuple(step.tasks) if first else (),
            )
            report = measure(written, config)
            summary["measure"][data] = report.to_dict()
            gates = threshold_failures(
                report,
                max_perplexity=step.max_perplexity,
                min_density=step.min_density if first else None,
            )
            failures += [f"{data}: {gate}" for gate in gates]
    return summary, failures
