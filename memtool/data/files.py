"""User data: text files, jsonl files, directories, and Hugging Face datasets.

A user's files are not split into calibration and evaluation: the user chose them for the job at
hand, so both splits read the same documents (reported as split "all"). A Hugging Face dataset
has its own splits: `hf:NAME:CONFIG:SPLIT` pins one (also reported as "all"); without SPLIT,
calibration reads "train" and evaluation reads "test".
"""

import json
from pathlib import Path

from memtool.data.spec import DataSpec, Split
from memtool.errors import MemtoolError


def _read_utf8(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MemtoolError(
            f"{path} is not UTF-8 text (byte {exc.start}); convert it or leave it out"
        ) from exc
    except OSError as exc:
        raise MemtoolError(f"cannot read {path}: {exc.strerror or exc}") from exc


def text_file_texts(path: Path) -> list[str]:
    """The whole file as one document."""
    text = _read_utf8(path)
    if not text.strip():
        raise MemtoolError(f"{path} is empty; give a file with text in it")
    return [text]


def jsonl_texts(path: Path, field: str) -> list[str]:
    """Field `field` of each JSON object, one per line; blank lines and empty texts skipped."""
    texts = []
    for number, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MemtoolError(
                f"{path}:{number} is not valid JSON ({exc.msg}); each line must be one JSON object"
            ) from exc
        if not isinstance(record, dict) or field not in record:
            raise MemtoolError(
                f"{path}:{number} has no field {field!r}; pick the field with {path}:FIELD"
            )
        value = record[field]
        if not isinstance(value, str):
            raise MemtoolError(
                f"{path}:{number} field {field!r} is {type(value).__name__}, not a string"
            )
        if value.strip():
            texts.append(value)
    if not texts:
        raise MemtoolError(f"{path} has no non-empty {field!r} texts")
    return texts


def directory_texts(path: Path, glob: str) -> list[str]:
    """Each file under `path` matching `glob` as one document, in sorted path order."""
    files = sorted(p for p in path.glob(glob) if p.is_file())
    if not files:
        raise MemtoolError(
            f"no files in {path} match {glob!r}; pick files with {path}:GLOB (e.g. '**/*.md')"
        )
    # Empty files (an empty __init__.py) are legitimate members of a tree, not an error.
    texts = [text for text in map(_read_utf8, files) if text.strip()]
    if not texts:
        raise MemtoolError(f"all {len(files)} files in {path} matching {glob!r} are empty")
    return texts


def hf_split_for(spec: DataSpec, split: Split) -> str:
    """The dataset split to read: the pinned one, else "train"/"test" for calibration/evaluation."""
    return spec.hf_split or ("train" if split == "calibration" else "test")


def hf_texts(spec: DataSpec, split: Split) -> list[str]:
    """Field `spec.field` of each row of a Hugging Face dataset split; empty texts skipped."""
    try:
        import datasets
    except ImportError as exc:
        raise MemtoolError(
            f"data spec {spec.describe()!r} needs the Hugging Face `datasets` package; "
            "pip install 'memtool[datasets]'"
        ) from exc
    hf_split = hf_split_for(spec, split)
    where = f"{spec.name}" + (f" ({spec.config})" if spec.config else "") + f" split {hf_split}"
    try:
        dataset = datasets.load_dataset(spec.name, spec.config, split=hf_split)
    # OSError covers an unreachable hub (ConnectionError), a missing dataset (FileNotFoundError)
    # and HTTP errors; ValueError an unknown config or split.
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as exc:
        hint = "" if spec.hf_split else "; pin a split with hf:NAME:CONFIG:SPLIT"
        reason = next(iter(str(exc).splitlines()), type(exc).__name__)  # errors stay one line
        raise MemtoolError(f"could not load Hugging Face dataset {where}: {reason}{hint}") from exc
    if spec.field not in dataset.column_names:
        raise MemtoolError(
            f"Hugging Face dataset {where} has no column {spec.field!r} (columns: "
            f"{', '.join(dataset.column_names)}); pick one with hf:...#COLUMN"
        )
    texts = [text for text in dataset[spec.field] if isinstance(text, str) and text.strip()]
    if not texts:
        raise MemtoolError(f"Hugging Face dataset {where} has no non-empty {spec.field!r} texts")
    return texts
