"""`BitStackLinear`: a linear layer holding some of its BitStack residual blocks.

The weight is never kept dense: each call reconstructs `Σ_j S_j ⊙ (u_j v_jᵀ)` over the loaded
blocks (or the Triton kernel fuses that into the matmul), so the layer holds only packed signs
and fp16 factors, and growing or shrinking it is appending or truncating blocks.
"""

import torch
from torch import Tensor, nn

from memtool import ops
from memtool.formats.bitstack_pack import packed_width


class BitStackLinear(nn.Module):
    """`y = (x / input_scale) @ Wᵀ + bias` with `W` the sum of the loaded blocks.

    Buffers (not persistent: the stack file, not the state dict, is their storage):
    `signs` uint8 `[blocks, out, ceil(in / 8)]`, `u` `[blocks, out, rank]`, `v`
    `[blocks, in, rank]`, and optionally `input_scale` `[in]` where the activation-aware scale
    could not be folded upstream.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: Tensor | None = None,
        input_scale: Tensor | None = None,
        factor_dtype: torch.dtype = torch.float16,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        width = packed_width(in_features)
        self.register_buffer(
            "signs", torch.zeros(0, out_features, width, dtype=torch.uint8), persistent=False
        )
        self.register_buffer("u", torch.zeros(0, out_features, rank, dtype=factor_dtype), False)
        self.register_buffer("v", torch.zeros(0, in_features, rank, dtype=factor_dtype), False)
        self.register_buffer("input_scale", input_scale, persistent=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.backend = ops.KernelBackend.AUTO

    @property
    def n_blocks(self) -> int:
        return self.signs.shape[0]

    def set_blocks(self, signs: Tensor, u: Tensor, v: Tensor) -> None:
        """Hold exactly these blocks (`[blocks, ...]` each), replacing the current ones."""
        self.signs, self.u, self.v = signs.contiguous(), u.contiguous(), v.contiguous()

    def append_blocks(self, signs: Tensor, u: Tensor, v: Tensor) -> None:
        self.set_blocks(
            torch.cat([self.signs, signs]), torch.cat([self.u, u]), torch.cat([self.v, v])
        )

    def keep_blocks(self, count: int) -> None:
        """Drop every block after the first `count` (copies, so the old storage is freed)."""
        self.set_blocks(self.signs[:count].clone(), self.u[:count].clone(), self.v[:count].clone())

    def forward(self, x: Tensor) -> Tensor:
        if self.input_scale is not None:
            x = x / self.input_scale.to(x.dtype)
        return ops.bitstack_linear(
            x, self.signs, self.u, self.v, self.in_features, self.bias, backend=self.backend
        )

    def logical_weight_count(self) -> int:
        bias = self.bias.numel() if self.bias is not None else 0
        return self.in_features * self.out_features + bias

    def weight_storage_bytes(self) -> int:
        tensors = (self.signs, self.u, self.v, self.input_scale, self.bias)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, blocks={self.n_blocks}"
        )
