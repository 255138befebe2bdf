"""The specification of the streamed FFN: the dense FFN with the same neuron mask applied.

`masked_dense(model, selectors)` makes every FFN of an ordinary in-memory model compute all of
its neurons and then zero those the selector (and, for SwiGLU levels, the exact CATS
threshold) drops. A flash model built from a store of the same weights must generate the same
tokens (issue 5's correctness target), and perplexity under this context is the quality cost
of a sparsity choice.
"""

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from memtool.models.layers import decoder_layers
from memtool.serve.flash.sparsity import LayerSelector, ffn_parts


def _masked(
    selector: LayerSelector,
    gate: nn.Linear,
    up: nn.Linear | None,
    down: nn.Linear,
    recorded: list[Tensor] | None,
):
    def forward(x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        pre = gate(flat)
        act = selector.act(pre)
        if recorded is not None:  # the masks a flash run applied, call by call
            keep = recorded.pop(0)
        else:
            keep, _ = selector.mask(flat)
            if selector.cats_threshold is not None:
                keep = keep & (act.abs() > selector.cats_threshold)
        hidden = act * up(flat) * keep if up is not None else act * keep
        return down(hidden).reshape(*shape[:-1], -1)

    return forward


@contextlib.contextmanager
def masked_dense(
    model: nn.Module,
    selectors: list[LayerSelector],
    recorded: list[list[Tensor]] | None = None,
) -> Iterator[nn.Module]:
    """Within the block, `model`'s FFNs apply `selectors`' masks; restored afterwards.

    With `recorded` (per layer, the masks a flash model applied: `FlashFFN.recorded`), each
    FFN call applies the next recorded mask instead of recomputing it, so threshold decisions
    cannot flip on rounding differences: the "same neuron mask" comparison, exactly.
    """
    restore = []
    per_layer = recorded or [None] * len(selectors)
    try:
        for layer, selector, masks in zip(decoder_layers(model), selectors, per_layer, strict=True):
            kind, _, _ = ffn_parts(layer)
            if kind == "swiglu":
                mlp = layer.mlp
                restore.append((mlp, "forward", mlp.forward))
                mlp.forward = _masked(selector, mlp.gate_proj, mlp.up_proj, mlp.down_proj, masks)
            else:
                fc1, fc2 = layer.fc1, layer.fc2
                restore += [(layer, "fc1", fc1), (layer, "fc2", fc2)]
                restore.append((layer, "activation_fn", layer.activation_fn))
                layer.fc1 = _Call(_masked(selector, fc1, None, fc2, masks))
                layer.activation_fn, layer.fc2 = nn.Identity(), nn.Identity()
        yield model
    finally:
        for owner, name, value in reversed(restore):
            if name == "forward":
                del owner.forward  # back to the class's method
            else:
                setattr(owner, name, value)


class _Call(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)
