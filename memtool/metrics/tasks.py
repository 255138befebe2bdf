"""Task accuracy through lm-evaluation-harness (optional: `pip install 'memtool[eval]'`).

memtool hands lm-eval the model object it loaded (quantized, BitStack at a budget, anything
`load_model` returns) with its tokenizer, so what is scored is exactly what `measure` measured.
A task is given as:

- `FILE.jsonl`: memtool's local multiple-choice format, one item per line,
  `{"query": "...", "choices": ["...", ...], "answer": INDEX}`; scored by lm-eval as
  `multiple_choice` (the log-likelihood of each choice after the query and one space, lm-eval's
  target delimiter) with `acc` and `acc_norm`.
- `FILE.yaml`: an lm-eval task config (its `task` name is read from it; its folder is searched
  for included configs). Data paths in it are the user's: local files keep the run offline.
- `NAME`: a task lm-eval knows; its data come from wherever lm-eval fetches them.

When every task is a local file, the Hugging Face libraries are told to stay offline, so a
machine without a hub never waits on one.
"""

import contextlib
import json
import os
import sys
from pathlib import Path

from memtool.errors import MemtoolError

INSTALL_HINT = "pip install 'memtool[eval]' (or pip install lm_eval)"


def _jsonl_task(path: Path) -> dict:
    """The lm-eval task config of a local multiple-choice JSONL file, checked line by line."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise MemtoolError(f"task file {path} has no items")
    for number, line in enumerate(lines, 1):
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MemtoolError(f"{path}:{number}: not JSON ({exc.msg})") from None
        choices = item.get("choices") if isinstance(item, dict) else None
        if not isinstance(item, dict) or not isinstance(item.get("query"), str):
            raise MemtoolError(f'{path}:{number}: an item needs a "query" string')
        if not isinstance(choices, list) or len(choices) < 2:
            raise MemtoolError(f'{path}:{number}: "choices" must list two or more strings')
        if not all(isinstance(c, str) for c in choices):
            raise MemtoolError(f'{path}:{number}: "choices" must list two or more strings')
        answer = item.get("answer")
        if not isinstance(answer, int) or isinstance(answer, bool):
            raise MemtoolError(f'{path}:{number}: "answer" must be the index of the right choice')
        if not 0 <= answer < len(choices):
            raise MemtoolError(f'{path}:{number}: "answer" {answer} is not a choice index')
    return {
        "task": path.stem,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{query}}",
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    }


def _yaml_task_name(path: Path) -> str:
    import yaml  # lm-eval depends on PyYAML

    class Loader(yaml.SafeLoader):
        """Reads lm-eval's `!function module.name` tags as nothing: only the name is wanted."""

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    try:
        config = yaml.load(path.read_text(), Loader=Loader)
    except yaml.YAMLError as exc:
        raise MemtoolError(f"task file {path} is not YAML: {exc}") from None
    name = config.get("task") if isinstance(config, dict) else None
    if not isinstance(name, str):
        raise MemtoolError(f"task file {path} names no task (a 'task:' key)")
    return name


@contextlib.contextmanager
def _untied_call(model):
    """HFLM calls `model.tie_weights()`; memtool's loaders already tied what the checkpoint
    ties, and a compressed model (a BitStack stack's embeddings are plain tensors, not
    parameters) cannot be re-tied by name, so the call is a no-op while HFLM is built."""
    model.tie_weights = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del model.tie_weights  # the class's method again


def resolve_tasks(specs: list[str]) -> tuple[list, list[str], bool]:
    """(tasks for lm-eval, folders to include, whether every task is local)."""
    tasks, include, local = [], [], True
    for spec in specs:
        path = Path(spec).expanduser()
        if path.suffix == ".jsonl":
            if not path.is_file():
                raise MemtoolError(f"task file {path} does not exist")
            tasks.append(_jsonl_task(path))
        elif path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise MemtoolError(f"task file {path} does not exist")
            tasks.append(_yaml_task_name(path))
            include.append(str(path.resolve().parent))
        else:
            tasks.append(spec)
            local = False
    return tasks, include, local


def task_scores(
    loaded, specs: list[str], limit: int | None = None, batch_size: int = 1
) -> dict[str, dict]:
    """Score `loaded` (a `LoadedModel`) on lm-eval tasks: {task: {metric: value, "samples": n}}.

    Metrics keep lm-eval's names (acc, acc_norm, exact_match, ... and their *_stderr).

    Raises:
        MemtoolError: lm-eval not installed, a bad task file, or a task lm-eval does not know.
    """
    if not specs:
        raise MemtoolError("--tasks needs at least one task")
    if limit is not None and limit < 1:
        raise MemtoolError(f"--task-limit must be at least 1, not {limit}")
    tasks, include, local = resolve_tasks(specs)
    if local:  # before the imports: the libraries read these when loaded
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise MemtoolError(f"task accuracy needs lm-evaluation-harness: {INSTALL_HINT}") from None
    manager = TaskManager(include_path=include or None, verbosity="ERROR")
    known = set(manager.all_tasks)
    for task in tasks:
        if isinstance(task, str) and task not in known:
            raise MemtoolError(
                f"lm-eval knows no task {task!r}: give a task name it lists, a task .yaml, or a "
                "multiple-choice .jsonl file"
            )
    device = str(next(loaded.model.parameters()).device)
    # lm-eval writes progress and notes to stdout in places: keep stdout for memtool's JSON.
    with contextlib.redirect_stdout(sys.stderr), _untied_call(loaded.model):
        model = HFLM(
            pretrained=loaded.model,
            tokenizer=loaded.tokenizer,
            batch_size=batch_size,
            device=device,
        )
        result = lm_eval.simple_evaluate(
            model=model,
            tasks=tasks,
            task_manager=manager,
            limit=limit,
            bootstrap_iters=1000,
            log_samples=False,
            verbosity="ERROR",
        )
    scores = {}
    for name, metrics in result["results"].items():
        values = {
            key.split(",")[0]: value
            for key, value in metrics.items()
            if "," in key and isinstance(value, (int, float))
        }
        samples = result.get("n-samples", {}).get(name, {})
        scores[name] = {**values, "samples": samples.get("effective")}
    return scores
