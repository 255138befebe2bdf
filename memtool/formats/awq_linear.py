"""The runtime module for AWQ GEMM-layout layers: packed codes stay packed in memory.

`AWQLinear` holds exactly the tensors of an AWQ GEMM checkpoint (qweight, qzeros, scales, bias)
and computes `x @ W + b` with the PyTorch reference dequantization of `memtool.formats.awq_pack`
(the whole weight is dequantized to float32 per call: the reference favours clarity over speed;
no device kernel exists for this layout yet). Like `GPTQLinear`, it reports its own logical
weight count and storage bytes, so `memtool measure` prints true bits per weight.
"""

import torch
from torch import nn

from memtool.formats.awq_pack import AWQ_BITS, AWQ_PACK, check_awq_tensors, dequantize_awq
from memtool.ops.reference import check_linear_inputs


class AWQLinear(nn.Module):
    """A 4-bit linear layer stored in the AWQ GEMM layout (see `memtool.formats.awq_pack`)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int,
        bias: bool,
        bias_dtype: torch.dtype = torch.float16,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = AWQ_BITS, group_size
        n_groups = in_features // group_size
        packed = out_features // AWQ_PACK
        self.register_buffer("qweight", torch.zeros(in_features, packed, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(n_groups, packed, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=torch.float16))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype) if bias else None)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "AWQLinear":
        """Build from checkpoint tensors (`qweight`, `qzeros`, `scales`, optionally `bias`).

        Raises:
            MemtoolError: the tensors do not form one AWQ GEMM layer.
        """
        in_features, out_features, group_size = check_awq_tensors(
            tensors["qweight"], tensors["qzeros"], tensors["scales"]
        )
        bias = tensors.get("bias")
        module = cls(
            in_features,
            out_features,
            group_size,
            bias is not None,
            bias.dtype if bias is not None else torch.float16,
        )
        for name in ("qweight", "qzeros", "scales", "bias"):
            if tensors.get(name) is not None:
                setattr(module, name, tensors[name].contiguous())
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_linear_inputs(x, self.bias, self.qweight, self.in_features, self.out_features)
        weight = dequantize_awq(self.qweight, self.qzeros, self.scales)
        out = x.reshape(-1, self.in_features).float() @ weight
        if self.bias is not None:
            out = out + self.bias.float()
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def logical_weight_count(self) -> int:
        bias = self.out_features if self.bias is not None else 0
        return self.in_features * self.out_features + bias

    def weight_storage_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}"
        )
