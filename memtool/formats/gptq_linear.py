"""The runtime module for GPTQ-layout layers: packed codes stay packed in memory.

`GPTQLinear` holds exactly the tensors of a GPTQ checkpoint (qweight, qzeros, scales, g_idx,
bias) and computes `x @ W + b` through `memtool.ops.gptq_linear`, which picks the Triton kernel
on CUDA and the PyTorch reference elsewhere. It reports its own logical weight count and storage
bytes, so `memtool measure` prints true bits per weight.

Act-order checkpoints whose groups were fitted in act order (GPTQModel's `desc_act` default,
memtool's `--dynamic-groups`) have a shuffled g_idx, which the native CPU kernel cannot read.
Such a layer holds its input rows sorted by group instead (repacked once, at load) and permutes
the features of `x` to match in each call (a gather of the activations, as exllama does); its
state dict still gives the checkpoint's own layout.
"""

import torch
from torch import nn

from memtool import ops
from memtool.formats.gptq_pack import pack_along_rows, unpack_along_rows
from memtool.ops.cpu import find_static_group_size

ROW_KEYS = ("qweight", "g_idx")  # the buffers held in sorted row order


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
        # Input features in the order the rows are held (see the module docstring); None when
        # they are held in checkpoint order.
        self.register_buffer("in_order", None, persistent=False)

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
        module.sort_groups()
        return module

    def sort_groups(self) -> None:
        """Hold the input rows sorted by group when that turns a shuffled g_idx into contiguous
        groups of equal size (the layout the kernels are fastest on); else leave them."""
        if self.in_order is not None or find_static_group_size(self.g_idx) is not None:
            return
        order = torch.argsort(self.g_idx, stable=True).to(torch.int32)  # int32: half the bytes
        if find_static_group_size(self.g_idx[order]) is None:
            return  # groups of uneven sizes: no contiguous layout to sort into
        self._permute_rows(order)
        self.in_order = order

    def _permute_rows(self, order: torch.Tensor) -> None:
        codes = unpack_along_rows(self.qweight, self.bits, self.in_features)
        self.qweight = pack_along_rows(codes[order], self.bits)
        self.g_idx = self.g_idx[order].contiguous()

    def _checkpoint_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """qweight and g_idx in the checkpoint's row order."""
        if self.in_order is None:
            return self.qweight, self.g_idx
        restore = torch.argsort(self.in_order.long())
        codes = unpack_along_rows(self.qweight, self.bits, self.in_features)
        return pack_along_rows(codes[restore], self.bits), self.g_idx[restore].contiguous()

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.in_order is not None:  # write the checkpoint's layout back
            destination[prefix + "qweight"], destination[prefix + "g_idx"] = self._checkpoint_rows()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Incoming tensors are in checkpoint order: go back to it (one of qweight and g_idx may
        # come alone), load, then sort anew. A state dict without them leaves the rows as held.
        if self.in_order is not None and any(prefix + k in state_dict for k in ROW_KEYS):
            self.qweight, self.g_idx = self._checkpoint_rows()
            self.in_order = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.sort_groups()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_order is not None:
            x = x.index_select(-1, self.in_order)
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
