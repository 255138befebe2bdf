"""Writing a quantized Hugging Face folder: what the GPTQ and AWQ writers share.

Tensors that are not quantized are stored in float16 (the dtype GPTQ/AWQ kernels compute in),
tied tensors once (transformers re-ties them on load); each quantized linear contributes its
packed tensors instead of its `.weight`; config.json carries `quantization_config`. The folder
appears through one atomic rename, so an interrupted run leaves no partial output.
"""

import json
from pathlib import Path

import torch
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
