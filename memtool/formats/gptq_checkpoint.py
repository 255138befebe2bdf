"""GPTQ checkpoints as the ecosystem writes them: a Hugging Face folder whose config.json carries
`quantization_config` (quant_method "gptq") and whose safetensors hold, per quantized linear,
`qweight`/`qzeros`/`scales`/`g_idx` (+ `bias`) in the layout of `memtool.formats.gptq_pack`.

Writing: tensors that are not quantized are stored in float16 (GPTQ kernels compute in float16),
tied tensors once; a `quantize_config.json` copy of the config is written for GPTQModel. The
output folder appears atomically: an interrupted run leaves no partial folder.

Reading: memtool's own checkpoints and those of GPTQModel/AutoGPTQ (`checkpoint_format` "gptq",
the v1 zero convention). The model is built without weights, each quantized linear becomes a
`GPTQLinear` holding the packed tensors, and nothing is ever dequantized as a whole.
"""

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from memtool import __version__
from memtool.atomic import clean_stale_temporaries
from memtool.errors import MemtoolError
from memtool.formats.checkpoint_io import load_quantized_folder, write_quantized_folder
from memtool.formats.gptq_linear import GPTQLinear
from memtool.formats.gptq_pack import pack_gptq
from memtool.formats.quantized_weight import QuantizedWeight
from memtool.metrics.memory import release_freed_memory

QUANT_KEYS = ("qweight", "qzeros", "scales", "g_idx")


def gptq_quantization_config(
    bits: int,
    group_size: int,
    sym: bool,
    act_order: bool,
    extra: dict | None = None,
    static_groups: bool = False,
    true_sequential: bool = False,
) -> dict:
    """The `quantization_config` block transformers, GPTQModel and AutoGPTQ read."""
    return {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": act_order,
        # Static act-order groups keep g_idx = i // group_size (no reordering at inference).
        "static_groups": act_order and static_groups,
        "sym": sym,
        "true_sequential": true_sequential,
        "pack_dtype": "int32",
        "damp_percent": (extra or {}).get("damp_percent", 0.01),
        "meta": {"quantizer": [f"memtool:{__version__}"], **(extra or {})},
    }


def save_gptq_checkpoint(
    model: nn.Module,
    tokenizer,
    weights: dict[str, QuantizedWeight],
    quantization_config: dict,
    output: Path,
    overwrite: bool = False,
) -> Path:
    """Write `model` with `weights` packed into a GPTQ folder at `output` (atomically)."""
    output = Path(output)
    prepare_output(output, overwrite)
    packed = {}
    for name, weight in weights.items():
        packed[name] = pack_gptq(
            weight.codes.T.to(torch.int32),
            weight.zeros.T.contiguous(),
            weight.scales.T.contiguous(),
            weight.g_idx,
            weight.bits,
        )
        # Packing goes through 64-bit copies of the codes; glibc keeps those freed pages
        # between the small packed outputs it keeps, which grew the default model's 4-bit
        # job by ~580 MB here (its peak) without this.
        release_freed_memory()
    extra = {"quantize_config.json": json.dumps(quantization_config, indent=2)}
    return write_quantized_folder(
        model, tokenizer, packed, quantization_config, output, "GPTQ", extra
    )


def prepare_output(output: Path, overwrite: bool) -> None:
    """Refuse to clobber a folder unless asked; clear leftovers of interrupted runs."""
    if output.exists():
        if not overwrite:
            raise MemtoolError(f"output {output} already exists; pick another path or --overwrite")
        if output.is_dir():
            shutil.rmtree(output)
        else:
            output.unlink()
    clean_stale_temporaries(output.parent, output.name)


def is_gptq_config(config: dict) -> bool:
    quant = config.get("quantization_config") or {}
    return quant.get("quant_method") == "gptq"


def load_gptq_model(folder: Path, weight_files: list[Path], dtype: torch.dtype) -> nn.Module:
    """Build the model in `folder` with its quantized linears as `GPTQLinear` modules."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    quant = config.quantization_config
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    if quant.get("checkpoint_format", "gptq") != "gptq":
        raise MemtoolError(
            f"{folder} uses GPTQ checkpoint_format {quant['checkpoint_format']!r}; memtool reads "
            "'gptq' (the published v1 layout)"
        )
    bits = int(quant["bits"])
    del config.quantization_config
    return load_quantized_folder(
        folder, config, weight_files, dtype, "GPTQ", QUANT_KEYS,
        lambda parts: GPTQLinear.from_tensors(parts, bits),
    )  # fmt: skip
