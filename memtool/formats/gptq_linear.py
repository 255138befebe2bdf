"""The runtime module for GPTQ-layout layers: packed codes stay packed in memory.

`GPTQLinear` holds exactly the tensors of a GPTQ checkpoint (qweight, qzeros, scales, g_idx,
bias) and computes `x @ W + b` through `memtool.ops.gptq_linear`, which picks the Triton kernel
on CUDA and the PyTorch reference elsewhere. It reports its own logical weight count and storage
bytes, so `memtool measure` prints true bits per weight.
"""

import torch
from torch import nn

from memtool import ops


class GPTQLinear(nn.Module):
    """A linear layer stored in the GPTQ layout (see `memtool.formats.gptq_pack`)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        n_groups: int,
        bias: bool,
        bias_dtype: torch.dtype = torch.float16,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.register_buffer(
            "qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32)
        )
        self.register_buffer(
            "qzeros", torch.zeros(n_groups, out_features * bits // 32, dtype=torch.int32)
        )
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype) if bias else None)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], bits: int) -> "GPTQLinear":
        """Build from checkpoint tensors (`qweight`, `qzeros`, `scales`, `g_idx`, opt. `bias`)."""
        in_features = tensors["g_idx"].shape[0]
        out_features = tensors["qweight"].shape[1]
        bias = tensors.get("bias")
        module = cls(
            in_features,
            out_features,
            bits,
            tensors["scales"].shape[0],
            bias is not None,
            bias.dtype if bias is not None else torch.float16,
        )
        for name in ("qweight", "qzeros", "scales", "g_idx", "bias"):
            if tensors.get(name) is not None:
                setattr(module, name, tensors[name].contiguous())
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.gptq_linear(
            x,
            self.qweight,
            self.qzeros,
            self.scales,
            self.g_idx,
            self.bits,
            self.in_features,
            bias=self.bias,
        )

    def logical_weight_count(self) -> int:
        bias = self.out_features if self.bias is not None else 0
        return self.in_features * self.out_features + bias

    def weight_storage_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        groups = self.scales.shape[0]
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, groups={groups}"
