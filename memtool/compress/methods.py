"""Each method's per-layer step, registered against its config type."""

import torch
from torch import nn

from memtool.compress.config import GPTQConfig, RTNConfig
from memtool.compress.gptq import gptq_quantize
from memtool.compress.hessian import HessianGroup
from memtool.compress.quantizer import QuantizedWeight, rtn_quantize


def split_rows(weight: QuantizedWeight, row_counts: list[int]) -> list[QuantizedWeight]:
    """Undo the stacking of linears that shared a Hessian: rows are independent."""
    parts, start = [], 0
    for rows in row_counts:
        parts.append(weight.rows(start, start + rows))
        start += rows
    return parts


def gptq_group_quantizer(config: GPTQConfig):
    """GPTQ for linears sharing one input: their rows are stacked into one call."""

    def quantize(
        modules: list[nn.Linear], group: HessianGroup
    ) -> tuple[list[QuantizedWeight], list[str]]:
        stacked = torch.cat([m.weight.detach().float() for m in modules], dim=0)
        result = gptq_quantize(
            stacked,
            group.hessian,
            bits=config.bits,
            group_size=config.group_size,
            sym=config.sym,
            act_order=config.act_order,
            static_groups=config.static_groups,
            damp_percent=config.damp_percent,
            block_size=config.block_size,
        )
        warnings = []
        if result.fallback_reason:
            warnings.append(f"{result.fallback_reason}; used round-to-nearest for these weights")
        return split_rows(result.weight, [m.out_features for m in modules]), warnings

    return quantize


def rtn_linear(module: nn.Linear, config: RTNConfig) -> QuantizedWeight:
    return rtn_quantize(module.weight.detach().float(), config.bits, config.group_size, config.sym)
