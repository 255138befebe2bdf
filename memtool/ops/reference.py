"""Reference kernels: pure PyTorch on any device, the specification the fast kernels must meet.

Each function here is the definition of its op. Device kernels (`memtool.ops.triton`) are tested
against these, within a stated tolerance, and CPU runs them directly. They favour clarity over
speed: the whole weight is dequantized to float32 before the matmul.
"""

from torch import Tensor

from memtool.errors import MemtoolError
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


__all__ = ["check_linear_inputs", "dequantize_gptq", "gptq_linear"]
