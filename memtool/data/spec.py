"""Data specs: the one string every command takes for calibration and evaluation text.

Accepted forms (what `parse_data_spec` reads):

- `wiki`: Wikipedia extracts (10,033 articles), split 90/10 into calibration/evaluation.
- `code`: the CPython standard library source of the running interpreter, split 90/10.
- `mixed`: `wiki` and `code` together (see `memtool.data.windows` for how windows are shared).
- `hf:NAME[:CONFIG][:SPLIT][#FIELD]`: a Hugging Face dataset (needs `memtool[datasets]`).
- `PATH`: an existing text file (the whole file is one document), a `.jsonl` file (one JSON
  object per line, field `text`), or a directory (files matching `**/*.txt`).
- `PATH:FIELD` / `PATH:GLOB`: pick the jsonl field or the directory glob; the part before the
  LAST `:` must be an existing path, so `notes/src:**/*.py` works.

`DataSpec.describe()` gives a canonical form (`text:/abs/a.txt`, `jsonl:/abs/d.jsonl#text`,
`dir:/abs/src#**/*.py`, `code:python3.11`) that results record; `parse_data_spec` reads it back,
so a results file's `data` string can be passed to the next command unchanged.
"""

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from memtool.errors import MemtoolError

Split = Literal["calibration", "evaluation"]

BUILTIN_KINDS = ("wiki", "code", "mixed")
# The stdlib text changes between Python versions, so specs built on it name the version.
PYTHON_TAG = f"python{sys.version_info.major}.{sys.version_info.minor}"
DEFAULT_FIELD = "text"
DEFAULT_GLOB = "**/*.txt"

_ACCEPTED = (
    "expected wiki, code, mixed, hf:NAME[:CONFIG][:SPLIT], or an existing path: a text file, "
    "a .jsonl file (PATH:FIELD picks the field), or a directory (PATH:GLOB picks the files)"
)


@dataclass(frozen=True)
class DataSpec:
    """The parsed form of a data spec string.

    Attributes:
        kind: "wiki", "code", "mixed", "text", "jsonl", "dir" or "hf".
        path: Absolute path of a text file, jsonl file or directory.
        field: Field holding the text, for "jsonl" and "hf" (default "text").
        glob: Files to read under a directory, for "dir" (default "**/*.txt").
        name: Hugging Face dataset name, for "hf".
        config: Hugging Face dataset config, for "hf" (None: the dataset's default).
        hf_split: Hugging Face split, for "hf" (None: "train" for calibration, "test" for
            evaluation).
    """

    kind: str
    path: Path | None = None
    field: str | None = None
    glob: str | None = None
    name: str | None = None
    config: str | None = None
    hf_split: str | None = None

    @property
    def is_builtin(self) -> bool:
        return self.kind in BUILTIN_KINDS

    def describe(self) -> str:
        """Canonical short text, e.g. "wiki", "code:python3.11", "jsonl:/abs/d.jsonl#content"."""
        if self.kind == "wiki":
            return "wiki"
        if self.kind in ("code", "mixed"):
            return f"{self.kind}:{PYTHON_TAG}"
        if self.kind == "text":
            return f"text:{self.path}"
        if self.kind == "jsonl":
            return f"jsonl:{self.path}#{self.field}"
        if self.kind == "dir":
            return f"dir:{self.path}#{self.glob}"
        parts = [self.name or "", self.config or "", self.hf_split or ""]
        while parts[-1] == "":  # drop trailing empty parts; keep "NAME::SPLIT" positional
            parts.pop()
        return f"hf:{':'.join(parts)}#{self.field}"


def parse_data_spec(text: str) -> DataSpec:
    """Parse a data spec string (forms listed in this module's docstring).

    Args:
        text: The spec, e.g. "wiki", "notes.txt", "data.jsonl:content", "src:**/*.py".

    Returns:
        The parsed spec; paths are made absolute.

    Raises:
        MemtoolError: The spec is not one of the accepted forms, or names a missing path.
    """
    text = text.strip()
    if not text:
        raise MemtoolError(f"empty data spec; {_ACCEPTED}")
    if text == "wiki":
        return DataSpec("wiki")
    kind, _, tag = text.partition(":")
    if kind in ("code", "mixed") and tag in ("", PYTHON_TAG):
        return DataSpec(kind)
    if kind in ("code", "mixed") and tag.startswith("python"):
        raise MemtoolError(
            f"data spec {text!r} names the standard library of {tag}, but memtool runs on "
            f"{PYTHON_TAG}; run it with {tag} or use '{kind}'"
        )
    if kind == "hf":
        return _parse_hf(text, tag)
    whole = Path(text).expanduser()
    if whole.exists():
        return _path_spec(whole, None)
    if kind in ("text", "jsonl", "dir") and tag.startswith("/"):
        return _parse_canonical(text, kind, tag)
    head, sep, tail = text.rpartition(":")
    if sep and head and Path(head).expanduser().exists():
        if not tail:
            raise MemtoolError(f"data spec {text!r} ends with ':'; give a field or glob after it")
        return _path_spec(Path(head).expanduser(), tail)
    candidate = head if sep and head else text
    if _looks_like_path(candidate):
        raise MemtoolError(f"no such file or directory: {Path(candidate).expanduser().absolute()}")
    raise MemtoolError(f"unknown data spec {text!r}; {_ACCEPTED}")


def _looks_like_path(text: str) -> bool:
    return "/" in text or text.startswith((".", "~")) or Path(text).suffix != ""


def _path_spec(path: Path, extra: str | None) -> DataSpec:
    path = path.resolve()
    if path.is_dir():
        return DataSpec("dir", path=path, glob=extra or DEFAULT_GLOB)
    if path.suffix == ".jsonl":
        return DataSpec("jsonl", path=path, field=extra or DEFAULT_FIELD)
    if extra is not None:
        raise MemtoolError(
            f"{path} is read as plain text and takes no ':{extra}'; a field applies to .jsonl "
            "files and a glob to directories"
        )
    return DataSpec("text", path=path)


def _parse_canonical(text: str, kind: str, rest: str) -> DataSpec:
    # The canonical forms describe() writes: text:/PATH, jsonl:/PATH#FIELD, dir:/PATH#GLOB.
    path_text, extra = rest, None
    if kind != "text" and "#" in rest:
        path_text, _, extra = rest.rpartition("#")
    path = Path(path_text)
    if not path.exists():
        raise MemtoolError(f"no such file or directory: {path} (from {text!r})")
    spec = _path_spec(path, extra or None)
    if spec.kind != kind:
        raise MemtoolError(f"data spec {text!r} says {kind} but {spec.path} is read as {spec.kind}")
    return spec


def _parse_hf(text: str, rest: str) -> DataSpec:
    rest, _, field = rest.partition("#")
    parts = rest.split(":")
    if not parts[0] or len(parts) > 3:
        raise MemtoolError(f"bad data spec {text!r}; expected hf:NAME[:CONFIG][:SPLIT][#FIELD]")
    name, config, hf_split = [*parts, "", ""][:3]
    return DataSpec(
        "hf",
        name=name,
        config=config or None,
        hf_split=hf_split or None,
        field=field or DEFAULT_FIELD,
    )
