"""Parameter counts, weight bytes and bits per weight.

Conventions (stated in `memtool measure` output):
- `params_non_embedding` excludes every `nn.Embedding` (token and learned position tables) and
  the output head, tied or not: the convention of the scaling-law papers (Kaplan et al.; the
  Densing Law paper counts N the same way).
- `weight_bytes` counts each storage once (tied weights are one tensor): parameters plus
  persistent buffers, i.e. what the weights occupy in memory.
- A compressed layer reports its own numbers through `logical_weight_count()` and
  `weight_storage_bytes()` (bitsandbytes layers are read directly); its tensors are then not
  counted again.
"""

from collections.abc import Iterator

import torch
from torch import nn


def _tensor_bytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


def _bnb_counts(module: nn.Module) -> tuple[int, int] | None:
    """(logical weights, storage bytes) of a bitsandbytes layer, whose packed parameter has
    fewer elements than the weights it stands for and whose scales live beside it."""
    kind = type(module).__name__
    if kind not in ("Linear4bit", "Linear8bitLt", "LinearNF4", "LinearFP4"):
        return None
    bias = module.bias.numel() if getattr(module, "bias", None) is not None else 0
    logical = module.in_features * module.out_features + bias
    storage = _tensor_bytes(module.weight) + _tensor_bytes(getattr(module, "bias", None))
    state = getattr(module.weight, "quant_state", None)
    if state is not None:  # 4-bit: per-block absmax (possibly itself quantized) and the code
        storage += _tensor_bytes(state.absmax) + _tensor_bytes(state.code)
        nested = getattr(state, "state2", None)
        if nested is not None:
            storage += _tensor_bytes(nested.absmax) + _tensor_bytes(nested.code)
    scb = getattr(module.weight, "SCB", None)
    if scb is None:
        scb = getattr(module.state, "SCB", None) if hasattr(module, "state") else None
    storage += _tensor_bytes(scb)  # 8-bit: one float scale per output row
    return logical, storage


def compressed_counts(module: nn.Module) -> tuple[int, int] | None:
    """(logical weights, storage bytes) for a layer that stores weights compressed, else None."""
    if hasattr(module, "logical_weight_count") and hasattr(module, "weight_storage_bytes"):
        return int(module.logical_weight_count()), int(module.weight_storage_bytes())
    return _bnb_counts(module)


def _is_compressed(module: nn.Module) -> bool:
    return compressed_counts(module) is not None


def _leaf_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers outside compressed modules, each storage once."""
    skip: list[str] = [name + "." for name, m in model.named_modules() if _is_compressed(m)]
    seen: set[int] = set()
    for name, tensor in _named_weights(model):
        if any(name.startswith(prefix) for prefix in skip):
            continue
        key = tensor.untyped_storage().data_ptr() if tensor.device.type != "meta" else id(tensor)
        key = (key, tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        yield name, tensor


def _named_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters(remove_duplicate=True)
    for module_name, module in model.named_modules():
        persistent = set(module._buffers) - module._non_persistent_buffers_set
        for buffer_name in sorted(persistent):
            buffer = module._buffers[buffer_name]
            if buffer is not None:
                yield (f"{module_name}.{buffer_name}" if module_name else buffer_name), buffer


def _embedding_prefixes(model: nn.Module) -> list[str]:
    prefixes = [name + "." for name, m in model.named_modules() if isinstance(m, nn.Embedding)]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        prefixes += [name + "." for name, m in model.named_modules() if m is head]
    return prefixes


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, non-embedding) logical parameter counts; tied tensors count once."""
    prefixes = _embedding_prefixes(model)
    total = non_embedding = 0
    for name, tensor in _leaf_tensors(model):
        if not isinstance(tensor, nn.Parameter):
            continue
        total += tensor.numel()
        if not any(name.startswith(p) for p in prefixes):
            non_embedding += tensor.numel()
    for name, module in model.named_modules():
        counts = compressed_counts(module)
        if counts is not None:
            count = counts[0]
            total += count
            if not any((name + ".").startswith(p) for p in prefixes):
                non_embedding += count
    return total, non_embedding


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights occupy (parameters, persistent buffers, compressed layers)."""
    total = sum(t.numel() * t.element_size() for _, t in _leaf_tensors(model))
    for module in model.modules():
        counts = compressed_counts(module)
        total += counts[1] if counts is not None else 0
    return total


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Linear layers of the network body: `nn.Linear` or compressed linears, not the head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        (name, m)
        for name, m in model.named_modules()
        if m is not head and (isinstance(m, nn.Linear) or _is_compressed(m))
    ]


def linear_bits_per_weight(model: nn.Module) -> float:
    """Storage bits per logical weight over the body's linear layers (weights and biases)."""
    bits = count = 0
    for _, module in linear_layers(model):
        counts = compressed_counts(module)
        if counts is not None:
            bits += 8 * counts[1]
            count += counts[0]
        else:
            for tensor in module.parameters(recurse=False):
                bits += 8 * tensor.numel() * tensor.element_size()
                count += tensor.numel()
    return bits / count if count else 0.0


def model_bits_per_weight(model: nn.Module) -> float:
    """Storage bits per logical parameter over the whole model."""
    total, _ = count_params(model)
    return 8 * weight_bytes(model) / total if total else 0.0
