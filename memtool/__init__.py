"""memtool: make large language models fit where memory is short.

The public API; the CLI (`memtool ...`) is a thin layer over these calls.
"""

__version__ = "0.1.0"

from memtool.errors import MemtoolError, ThresholdNotMet
from memtool.measurement import MeasureConfig, MeasureReport, measure
from memtool.models import DEFAULT_MODEL, LoadedModel, load_model
from memtool.sizes import format_size, parse_size

__all__ = [
    "DEFAULT_MODEL",
    "LoadedModel",
    "MeasureConfig",
    "MeasureReport",
    "MemtoolError",
    "ThresholdNotMet",
    "__version__",
    "format_size",
    "load_model",
    "measure",
    "parse_size",
]
