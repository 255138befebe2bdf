"""Finding a causal LM's decoder layers: one rule for compression, training and swapping."""

from torch import nn

from memtool.errors import MemtoolError


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers.

    With a Hugging Face config: the ModuleList as long as `num_hidden_layers` (first found, so
    the decoder's own list, never a list nested inside a layer). Without one (plain PyTorch
    models): the longest ModuleList whose children share one type.

    Raises:
        MemtoolError: no such list.
    """
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best: nn.ModuleList | None = None
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if n_layers is not None:
            if len(module) == n_layers:
                return module
        elif len({type(c) for c in module}) == 1 and (best is None or len(module) > len(best)):
            best = module
    if best is None:
        raise MemtoolError(
            f"cannot find the decoder layers of {type(model).__name__}: memtool handles "
            "decoder-only transformers whose layers form one ModuleList"
        )
    return best
