"""Random packed GPTQ and BitStack layers with known contents: kernel inputs without a model.

Tests compare kernels against references on these, and benchmarks time them; both need the
unpacked truth beside the packed tensors, drawn from a caller's generator so that a seed fixes
the layer. GPTQ codes are uniform over `[0, 2**bits)`, asymmetric zero points over
`[1, 2**bits]` (0 is not storable in the v1 layout, 2**bits is) or the symmetric midpoint, scales
uniform in `[1e-3, 1e-3 + scale_range)`. BitStack blocks are random signs with rank-`rank`
factors of standard deviation 0.1, each later block smaller by 1/(block number) with `decay`,
as a real stack's residual blocks are.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from memtool.formats.bitstack_pack import pack_signs
from memtool.formats.gptq_pack import pack_gptq


@dataclass(frozen=True)
class SyntheticGPTQ:
    """A packed GPTQ layer and what it was packed from.

    Attributes:
        q: codes `[in, out]`; zeros: zero points `[groups, out]`; scales: float32 `[groups, out]`
            (the packed ones are float16); g_idx: group of each input `[in]`.
        packed: `pack_gptq`'s tensors (`qweight`, `qzeros`, `scales`, `g_idx`).
    """

    bits: int
    q: Tensor
    zeros: Tensor
    scales: Tensor
    g_idx: Tensor
    packed: dict[str, Tensor]


def random_gptq_layer(
    bits: int,
    in_features: int,
    out_features: int,
    group_size: int,
    generator: torch.Generator,
    *,
    sym: bool = False,
    shuffle: bool = False,
    scale_range: float = 0.02,
) -> SyntheticGPTQ:
    """A random GPTQ layer; `shuffle` permutes `g_idx` (act-order with its groups kept)."""
    n_groups = -(-in_features // group_size)
    maxq = (1 << bits) - 1
    q = torch.randint(0, maxq + 1, (in_features, out_features), generator=generator)
    if sym:
        zeros = torch.full((n_groups, out_features), (maxq + 1) // 2)
    else:
        zeros = torch.randint(1, maxq + 2, (n_groups, out_features), generator=generator)
    scales = torch.rand(n_groups, out_features, generator=generator) * scale_range + 1e-3
    g_idx = torch.arange(in_features) // group_size
    if shuffle:
        g_idx = g_idx[torch.randperm(in_features, generator=generator)]
    return SyntheticGPTQ(bits, q, zeros, scales, g_idx, pack_gptq(q, zeros, scales, g_idx, bits))


@dataclass(frozen=True)
class SyntheticBitStack:
    """A packed BitStack layer: `signs` ±1 float32 `[blocks, out, in]`, `packed_signs` as the
    ops read them, factors `u` `[blocks, out, rank]` and `v` `[blocks, in, rank]`."""

    signs: Tensor
    packed_signs: Tensor
    u: Tensor
    v: Tensor

    @property
    def in_features(self) -> int:
        return self.signs.shape[2]

    def args(self, device: torch.device | str = "cpu") -> tuple:
        """Positional arguments of `memtool.ops.bitstack_linear` after the input."""
        return self.packed_signs.to(device), self.u.to(device), self.v.to(device), self.in_features


def random_bitstack_layer(
    out_features: int,
    in_features: int,
    rank: int,
    blocks: int,
    generator: torch.Generator,
    *,
    dtype: torch.dtype = torch.float16,
    decay: bool = True,
) -> SyntheticBitStack:
    """A random BitStack layer with factors in `dtype`."""
    draws = torch.randn(blocks, out_features, in_features, generator=generator)
    signs = torch.where(draws < 0, -1.0, 1.0)
    u = torch.randn(blocks, out_features, rank, generator=generator) * 0.1
    if decay:
        u = u * (1.0 / torch.arange(1, blocks + 1).float()[:, None, None])
    v = torch.randn(blocks, in_features, rank, generator=generator) * 0.1
    return SyntheticBitStack(signs, pack_signs(signs), u.to(dtype), v.to(dtype))
