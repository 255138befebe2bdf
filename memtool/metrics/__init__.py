"""Measurements: perplexity, parameter counts, bytes, bits per weight, memory."""

from memtool.metrics.memory import peak_rss_bytes
from memtool.metrics.perplexity import PROTOCOL, PerplexityResult, perplexity
from memtool.metrics.sizes import (
    count_params,
    linear_bits_per_weight,
    linear_layers,
    model_bits_per_weight,
    weight_bytes,
)

__all__ = [
    "PROTOCOL",
    "PerplexityResult",
    "count_params",
    "linear_bits_per_weight",
    "linear_layers",
    "model_bits_per_weight",
    "peak_rss_bytes",
    "perplexity",
    "weight_bytes",
]
