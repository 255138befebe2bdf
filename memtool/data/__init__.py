"""Calibration and evaluation text: one resolver for every command.

`parse_data_spec` reads a spec string (`wiki`, `code`, `mixed`, `hf:NAME[:CONFIG][:SPLIT]`, or
a path: text file, `.jsonl[:FIELD]`, directory`[:GLOB]`); `load_documents` resolves it to texts;
`evaluation_windows` and `calibration_windows` tokenize them into fixed-length token windows.
"""

from memtool.data.documents import Documents, load_documents
from memtool.data.spec import DataSpec, Split, parse_data_spec
from memtool.data.windows import (
    TokenWindows,
    calibration_windows,
    evaluation_windows,
    training_windows,
)

__all__ = [
    "DataSpec",
    "Documents",
    "Split",
    "TokenWindows",
    "calibration_windows",
    "evaluation_windows",
    "load_documents",
    "parse_data_spec",
    "training_windows",
]
