"""Reference kernels: pure PyTorch on any device, the specification the fast kernels must meet.

Each function here is the definition of its op. Device kernels (`memtool.ops.triton`) are tested
against these, within a stated tolerance, and CPU runs them directly. They favour clarity over
speed: the whole weight is dequantized to float32 before the matmul.
"""

import torch
from torch import Tensor

from memtool.errors import MemtoolError
from memtool.formats.bitstack_pack import packed_width, unpack_signs
from memtool.formats.gptq_pack import check_gptq_tensors, unpack_along_cols, unpack_along_rows


def dequantize_gptq(
    qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int, in_features: int
) -> Tensor:
    """Dequantize a GPTQ-packed weight to float32 `[in_features, out_features]`.

    `W[i, o] = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o])`, with `q` unpacked from
    `qweight` and `zero` unpacked from `qzeros` plus one (GPTQ "v1" checkpoints store zero - 1).
    The layout is described in `memtool.formats.gptq_pack`.

    Args:
        qweight: int32 `[in_features * bits // 32, out_features]`.
        qzeros: int32 `[n_groups, out_features * bits // 32]`.
        scales: float `[n_groups, out_features]` (float16 in checkpoints).
        g_idx: int32 `[in_features]`, the group of each input feature, in any order.
        bits: 2, 3, 4 or 8.
        in_features: input features (not recoverable from 3-bit shapes alone, so it is explicit).

    Returns:
        float32 tensor `[in_features, out_features]` on the device of `qweight`.
    """
    out_features = check_gptq_tensors(qweight, qzeros, scales, g_idx, bits, in_features)
    q = unpack_along_rows(qweight, bits, in_features)
    zeros = unpack_along_cols(qzeros, bits, out_features) + 1
    groups = g_idx.long()
    # Integer subtraction first: q - zero is exact, so the only rounding is the one product.
    return scales.float()[groups] * (q - zeros[groups]).float()


def gptq_linear(
    x: Tensor,
    qweight: Tensor,
    qzeros: Tensor,
    scales: Tensor,
    g_idx: Tensor,
    bits: int,
    in_features: int,
    bias: Tensor | None = None,
) -> Tensor:
    """`x @ W + bias` for a GPTQ-packed `W`, accumulated in float32.

    Args:
        x: activations `[..., in_features]`, any float dtype.
        qweight, qzeros, scales, g_idx, bits, in_features: as in `dequantize_gptq`.
        bias: optional `[out_features]`.

    Returns:
        `[..., out_features]` in `x.dtype`.
    """
    out_features = check_gptq_tensors(qweight, qzeros, scales, g_idx, bits, in_features)
    check_linear_inputs(x, bias, qweight, in_features, out_features)
    weight = dequantize_gptq(qweight, qzeros, scales, g_idx, bits, in_features)
    out = x.reshape(-1, in_features).float() @ weight
    if bias is not None:
        out = out + bias.float()
    return out.reshape(*x.shape[:-1], weight.shape[1]).to(x.dtype)


def check_linear_inputs(
    x: Tensor, bias: Tensor | None, weight: Tensor, in_features: int, out_features: int
) -> None:
    """Raise the `MemtoolError` every backend gives for activations or bias that do not fit.

    Args:
        x: activations `[..., in_features]`, a float dtype.
        bias: None or `[out_features]`.
        weight: any of the layer's tensors; x and bias must be on its device.
        in_features: input features of the layer.
        out_features: output features of the layer.
    """
    if not x.is_floating_point():
        raise MemtoolError(f"x must be a float tensor, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise MemtoolError(
            f"x has shape {tuple(x.shape)}; the layer expects {in_features} features last"
        )
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise MemtoolError(f"bias must be [{out_features}], got {tuple(bias.shape)}")
    for name, tensor in (("x", x), ("bias", bias)):
        if tensor is not None and tensor.device != weight.device:
            raise MemtoolError(f"{name} is on {tensor.device} but the weight is on {weight.device}")


def bitstack_reconstruct(signs: Tensor, u: Tensor, v: Tensor, in_features: int) -> Tensor:
    """The weight `[out_features, in_features]` that a BitStack linear's loaded blocks sum to.

    `W = Σ_j S_j ⊙ (u_j v_jᵀ)`, with `S_j` unpacked from `signs[j]` (layout in
    `memtool.formats.bitstack_pack`) and the factors widened to float32 before the product.

    Args:
        signs: uint8 `[blocks, out_features, ceil(in_features / 8)]`.
        u: `[blocks, out_features, rank]` (float16 in checkpoints).
        v: `[blocks, in_features, rank]`.
        in_features: input features (the packed width rounds up to 8).

    Returns:
        float32 `[out_features, in_features]` on the device of `signs`.
    """
    check_bitstack_tensors(signs, u, v, in_features)
    weight = torch.zeros(u.shape[1], in_features, dtype=torch.float32, device=signs.device)
    for j in range(signs.shape[0]):  # one block at a time: a transient of one weight's size
        magnitude = u[j].float() @ v[j].float().T
        weight.addcmul_(unpack_signs(signs[j], in_features), magnitude)
    return weight


def bitstack_linear(
    x: Tensor, signs: Tensor, u: Tensor, v: Tensor, in_features: int, bias: Tensor | None = None
) -> Tensor:
    """`x @ Wᵀ + bias` for the BitStack weight `W` of `bitstack_reconstruct`, in float32.

    Args:
        x: activations `[..., in_features]`, any float dtype.
        signs, u, v, in_features: as in `bitstack_reconstruct`.
        bias: optional `[out_features]`.

    Returns:
        `[..., out_features]` in `x.dtype`.
    """
    weight = bitstack_reconstruct(signs, u, v, in_features)
    check_linear_inputs(x, bias, signs, in_features, weight.shape[0])
    out = x.reshape(-1, in_features).float() @ weight.T
    if bias is not None:
        out = out + bias.float()
    return out.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)


def check_bitstack_tensors(signs: Tensor, u: Tensor, v: Tensor, in_features: int) -> None:
    """Raise `MemtoolError` unless the three tensors describe one BitStack linear."""
    if signs.dtype != torch.uint8 or signs.dim() != 3:
        raise MemtoolError(
            f"signs must be uint8 [blocks, out, bytes], got {signs.dtype} {tuple(signs.shape)}"
        )
    blocks, out_features, _ = signs.shape
    if u.dim() != 3 or tuple(u.shape[:2]) != (blocks, out_features):
        raise MemtoolError(f"u must be [{blocks}, {out_features}, rank], got {tuple(u.shape)}")
    if v.dim() != 3 or tuple(v.shape) != (blocks, in_features, u.shape[2]):
        raise MemtoolError(
            f"v must be [{blocks}, {in_features}, {u.shape[2]}], got {tuple(v.shape)}"
        )
    if signs.shape[2] != packed_width(in_features):
        raise MemtoolError(
            f"signs have {signs.shape[2]} bytes per row; {in_features} inputs need "
            f"{packed_width(in_features)}"
        )


__all__ = [
    "bitstack_linear",
    "bitstack_reconstruct",
    "check_bitstack_tensors",
    "check_linear_inputs",
    "dequantize_gptq",
    "gptq_linear",
]
