"""Writing and reading a quantized Hugging Face folder: what the GPTQ and AWQ formats share.

Tensors that are not quantized are stored in float16 (the dtype GPTQ/AWQ kernels compute in),
tied tensors once (transformers re-ties them on load); each quantized linear contributes its
packed tensors instead of its `.weight`; config.json carries `quantization_config`. The folder
appears through one atomic rename, so an interrupted run leaves no partial output. Reading
(`load_quantized_folder`) builds the model from its config with parameters on the meta device and
puts a packed module wherever a linear has a `qweight`.
"""

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from memtool.atomic import atomic_dir
from memtool.errors import MemtoolError

STORE_DTYPE = torch.float16


def narrow(tensor: torch.Tensor, dtype: torch.dtype, why: str) -> torch.Tensor:
    """`tensor` stored in the 16-bit `dtype` (non-float tensors as they are); `why` ends the
    error raised when a value overflows it."""
    if not tensor.is_floating_point():
        return tensor.contiguous()
    stored = tensor.detach().to(dtype).contiguous()
    if not torch.isfinite(stored).all():
        raise MemtoolError(f"a weight overflows {str(dtype).removeprefix('torch.')}; {why}")
    return stored


def unpacked_tensors(
    model: nn.Module, replaced: set[str] | dict, dtype: torch.dtype, why: str
) -> dict[str, torch.Tensor]:
    """The state dict minus the `.weight` of the modules in `replaced`, tied tensors once
    (transformers re-ties them on load), floats narrowed to `dtype`."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        module_name, _, leaf = name.rpartition(".")
        if (module_name in replaced and leaf == "weight") or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensors[name] = narrow(tensor, dtype, why)
    return tensors


def write_quantized_folder(
    model: nn.Module,
    tokenizer,
    packed: dict[str, dict[str, torch.Tensor]],
    quantization_config: dict,
    output: Path,
    layout: str,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write `model` with the linears in `packed` (module name -> its packed tensors).

    The caller has already checked `output` (`prepare_output`).
    """
    why = f"this model cannot be stored as {layout}"
    tensors = unpacked_tensors(model, packed, STORE_DTYPE, why)
    for name, parts in packed.items():
        for key, value in parts.items():
            tensors[f"{name}.{key}"] = value.contiguous()
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config
    config["dtype"] = "float16"
    config.pop("torch_dtype", None)
    with atomic_dir(output) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        for filename, text in (extra_files or {}).items():
            (tmp / filename).write_text(text)
        tokenizer.save_pretrained(tmp)
    return output


def load_quantized_folder(
    folder: Path,
    config,
    weight_files: list[Path],
    dtype: torch.dtype,
    label: str,
    keys: tuple[str, ...],
    build: Callable[[dict[str, torch.Tensor]], nn.Module],
) -> nn.Module:
    """The model of `config` (a transformers config whose `quantization_config` the caller has
    checked and removed) with every linear that has a `qweight` in `weight_files` replaced by
    `build(parts)`: its `keys` tensors, plus `bias` in `dtype` when stored. The other tensors
    load in `dtype`; tied embeddings are re-tied.

    Raises:
        MemtoolError: no quantized tensors, a `qweight` outside a linear, a packed shape that
            differs from the config's, or tensors missing or left over.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    state: dict[str, torch.Tensor] = {}
    for file in weight_files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                state[key] = handle.get_tensor(key)
    # Parameters on meta, buffers (rotary tables) computed for real.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    quantized = sorted({k.rsplit(".", 1)[0] for k in state if k.endswith(".qweight")})
    if not quantized:
        raise MemtoolError(f"{folder} says it is {label} but holds no qweight tensors")
    for name in quantized:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child, None)
        if not isinstance(linear, nn.Linear):
            raise MemtoolError(f"{folder}: {name}.qweight does not belong to a linear layer")
        parts = {key: state.pop(f"{name}.{key}") for key in keys}
        if f"{name}.bias" in state:
            parts["bias"] = state.pop(f"{name}.bias").to(dtype)
        module = build(parts)
        if (module.in_features, module.out_features) != (linear.in_features, linear.out_features):
            raise MemtoolError(
                f"{folder}: {name} is {module.out_features}x{module.in_features} in the "
                f"checkpoint but {linear.out_features}x{linear.in_features} in its config"
            )
        setattr(parent, child, module)
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    quantized_set = set(quantized)  # their buffers were set above, not through the state dict
    missing = [k for k in missing if k.rsplit(".", 1)[0] not in quantized_set]
    if missing or unexpected:
        raise MemtoolError(
            f"{folder}: checkpoint does not match its config (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    model.eval()
    return model
