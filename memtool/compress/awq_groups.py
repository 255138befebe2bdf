"""Which layers AWQ scales together in each architecture, and applying a scale exactly.

A scaling group is a module `prev` whose output feeds only the linears `linears`: dividing
`prev`'s output channels by `s` and multiplying the linears' input columns by `s` leaves the
network's function unchanged while changing how the linears' weights quantize. `inspect` is the
module whose output error judges a candidate `s` (AutoAWQ's `module2inspect`).

The groups follow AutoAWQ (`awq/models/llama.py` and `awq/models/opt.py`,
`get_layers_for_scaling`), with the two conditions under which they would change the function
checked instead of assumed (see `scaling_groups`).
"""

from dataclasses import dataclass

import torch
from torch import nn

from memtool.errors import MemtoolError

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
SUPPORTED_MODEL_TYPES = (*LLAMA_FAMILY, "opt")
# AutoAWQ does not clip q and k: their error passes through the q·k product, which the
# per-linear output error used by the clip search does not see.
NO_CLIP = ("q_proj", "k_proj")


@dataclass(frozen=True)
class ScaleGroup:
    """`prev`'s output channels feed exactly `linears`; `inspect` measures the error."""

    prev: str
    linears: tuple[str, ...]
    inspect: str

    @property
    def label(self) -> str:
        return f"{self.prev} -> {', '.join(self.linears)}"


def model_type(model: nn.Module) -> str:
    return str(getattr(model.config, "model_type", type(model).__name__))


def check_supported(model: nn.Module) -> None:
    """Raise `MemtoolError` unless AWQ knows the scaling groups of `model`'s architecture."""
    kind = model_type(model)
    if kind not in SUPPORTED_MODEL_TYPES:
        raise MemtoolError(
            f"AWQ has no scaling groups for model_type {kind!r} (it knows "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}); use GPTQ or RTN, or pass "
            "AWQConfig(fallback_rtn=True) to quantize it with round-to-nearest instead"
        )


def scaling_groups(model: nn.Module, layer: nn.Module) -> list[ScaleGroup]:
    """The scaling groups of one decoder layer of `model`, in AutoAWQ's order."""
    check_supported(model)
    config = model.config
    if model_type(model) in LLAMA_FAMILY:
        groups = [
            ScaleGroup(
                "input_layernorm",
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                "self_attn",
            )
        ]
        # With grouped-query attention v has fewer output channels than o has inputs (each v
        # channel feeds several heads), so one scale per o column cannot be folded into v.
        # AutoAWQ skips it too (llm-awq PR #67); o is then quantized with clipping only.
        if layer.self_attn.v_proj.out_features == layer.self_attn.o_proj.in_features:
            groups.append(ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"))
        groups.append(
            ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp")
        )
        # down's input is act(gate) * up, linear in up's output: up's rows can take 1/s.
        groups.append(ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"))
        return groups
    groups = []
    # OPT-350m applies its norms after the blocks; then they feed no linear and cannot scale.
    norm_first = getattr(config, "do_layer_norm_before", True)
    if norm_first:
        groups.append(
            ScaleGroup(
                "self_attn_layer_norm",
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                "self_attn",
            )
        )
    if layer.self_attn.v_proj.out_features == layer.self_attn.out_proj.in_features:
        groups.append(ScaleGroup("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj"))
    if norm_first:
        groups.append(ScaleGroup("final_layer_norm", ("fc1",), "fc1"))
    # relu(x / s) = relu(x) / s for s > 0; other activations would not commute with the scale.
    if getattr(config, "activation_function", "relu") == "relu":
        groups.append(ScaleGroup("fc1", ("fc2",), "fc2"))
    return groups


@torch.no_grad()
def apply_scale(layer: nn.Module, group: ScaleGroup, scales: torch.Tensor) -> None:
    """Fold `scales` into `group` in place: `prev` outputs / s, consumer input columns * s.

    Args:
        layer: the decoder layer holding the group's modules.
        group: which modules.
        scales: positive float `[channels]`, channels = the consumers' in_features.

    Raises:
        MemtoolError: `prev` is neither a linear nor a per-channel norm of that width.
    """
    prev = layer.get_submodule(group.prev)
    channels = scales.numel()
    scales = scales.to(device=prev.weight.device, dtype=torch.float32)
    if isinstance(prev, nn.Linear):
        if prev.out_features != channels:
            raise MemtoolError(f"{group.prev} has {prev.out_features} outputs, not {channels}")
        _divide(prev.weight, scales.view(-1, 1))
    elif tuple(prev.weight.shape) == (channels,):  # LayerNorm, RMSNorm: weight * normalized x
        _divide(prev.weight, scales)
    else:
        raise MemtoolError(f"cannot fold an AWQ scale into {group.prev} ({type(prev).__name__})")
    bias = getattr(prev, "bias", None)
    if bias is not None:
        _divide(bias, scales)
    for name in group.linears:
        weight = layer.get_submodule(name).weight
        weight.copy_((weight.float() * scales.view(1, -1)).to(weight.dtype))


def _divide(tensor: torch.Tensor, scales: torch.Tensor) -> None:
    tensor.copy_((tensor.float() / scales).to(tensor.dtype))
