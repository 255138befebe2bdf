"""Where memtool keeps its cache: `$MEMTOOL_HOME`, else `~/.cache/memtool`."""

import os
from pathlib import Path


def memtool_home() -> Path:
    env = os.environ.get("MEMTOOL_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "memtool"


def models_dir() -> Path:
    return memtool_home() / "models"


def downloads_dir() -> Path:
    return memtool_home() / "downloads"


def data_dir() -> Path:
    return memtool_home() / "data"


def locks_dir() -> Path:
    return memtool_home() / "locks"
