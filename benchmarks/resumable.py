"""A long benchmark's results file, saved as it goes so that a rerun resumes where it stopped.

Scripts in this folder run as `python benchmarks/NAME.py`, which puts this folder on the path:
`from resumable import open_results`.
"""

import json
from collections.abc import Callable
from pathlib import Path


def open_results(work: Path) -> tuple[dict, Callable[[], None]]:
    """`(results, save)`: `work/results.json` as left by an earlier run (empty if none), and a
    function writing `results` back; `work` is created."""
    work.mkdir(parents=True, exist_ok=True)
    path = work / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}

    def save() -> None:
        path.write_text(json.dumps(results, indent=1))

    return results, save
