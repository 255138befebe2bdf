"""Compression: round-to-nearest, GPTQ, AWQ and bitsandbytes quantization, in formats the
ecosystem loads (GPTQ layout, AWQ GEMM layout, transformers' bitsandbytes checkpoints)."""

from memtool.compress.api import CompressResult, compress
from memtool.compress.bnb import BnbConfig
from memtool.compress.config import (
    AWQConfig,
    BitStackConfig,
    CalibrationConfig,
    GPTQConfig,
    RTNConfig,
)
from memtool.compress.quantizer import QuantizedWeight, rtn_quantize

__all__ = [
    "AWQConfig",
    "BitStackConfig",
    "BnbConfig",
    "CalibrationConfig",
    "CompressResult",
    "GPTQConfig",
    "QuantizedWeight",
    "RTNConfig",
    "compress",
    "rtn_quantize",
]
