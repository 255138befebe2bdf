"""Compression: round-to-nearest and GPTQ quantization, written in the GPTQ layout."""

from memtool.compress.api import CompressResult, compress
from memtool.compress.config import CalibrationConfig, GPTQConfig, RTNConfig
from memtool.compress.quantizer import QuantizedWeight, rtn_quantize

__all__ = [
    "CalibrationConfig",
    "CompressResult",
    "GPTQConfig",
    "QuantizedWeight",
    "RTNConfig",
    "compress",
    "rtn_quantize",
]
