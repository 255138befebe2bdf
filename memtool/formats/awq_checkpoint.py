"""AWQ checkpoints as AutoAWQ writes them: a Hugging Face folder whose config.json carries
`quantization_config` (quant_method "awq", version "gemm") and whose safetensors hold, per
quantized linear, `qweight`/`qzeros`/`scales` (+ `bias`) in the layout of
`memtool.formats.awq_pack`.

The config block follows AutoAWQ's `save_quantized` and transformers' `AwqConfig`:
`{"quant_method": "awq", "bits": 4, "group_size": G, "zero_point": ..., "version": "gemm",
"modules_to_not_convert": null}` plus memtool's `meta`. `zero_point` says whether groups were
fitted asymmetrically; the GEMM layout always carries qzeros (a symmetric group stores 8), which
every GEMM reader applies.

Writing: tensors that are not quantized are stored in float16 (the GEMM kernels compute in
float16), tied tensors once; the folder appears atomically. Reading: the model is built without
weights and each quantized linear becomes an `AWQLinear` holding the packed tensors; transformers'
own AWQ path (which needs a GPU kernel package) is never triggered.
"""

from pathlib import Path

import torch
from torch import nn

from memtool import __version__
from memtool.errors import MemtoolError
from memtool.formats.awq_linear import AWQLinear
from memtool.formats.awq_pack import AWQ_BITS, pack_awq
from memtool.formats.checkpoint_io import load_quantized_folder, write_quantized_folder
from memtool.formats.gptq_checkpoint import prepare_output
from memtool.formats.quantized_weight import QuantizedWeight

AWQ_KEYS = ("qweight", "qzeros", "scales")


def awq_quantization_config(group_size: int, zero_point: bool, extra: dict | None = None) -> dict:
    """The `quantization_config` block AutoAWQ writes and transformers/vLLM read (GEMM, 4-bit)."""
    return {
        "quant_method": "awq",
        "bits": AWQ_BITS,
        "group_size": group_size,
        "zero_point": zero_point,
        "version": "gemm",
        "modules_to_not_convert": None,
        "meta": {"quantizer": [f"memtool:{__version__}"], **(extra or {})},
    }


def save_awq_checkpoint(
    model: nn.Module,
    tokenizer,
    weights: dict[str, QuantizedWeight],
    quantization_config: dict,
    output: Path,
    overwrite: bool = False,
) -> Path:
    """Write `model` with `weights` packed into an AWQ GEMM folder at `output` (atomically).

    Args:
        model: the model whose other tensors (norms, embeddings, head) are written as they are
            now (after AWQ they hold the scaled norms).
        tokenizer: saved beside the weights.
        weights: 4-bit quantized weights by full module name, groups tiling the input exactly.
        quantization_config: from `awq_quantization_config`.
        output: folder to create.
        overwrite: replace an existing folder.

    Raises:
        MemtoolError: a weight is not 4-bit or does not fit the layout; output exists.
    """
    output = Path(output)
    prepare_output(output, overwrite)
    for name, weight in weights.items():
        if weight.bits != AWQ_BITS:
            raise MemtoolError(f"{name} has {weight.bits}-bit codes; the AWQ GEMM layout is 4-bit")
    packed = {
        name: pack_awq(weight.codes.T.to(torch.int32), weight.zeros.T.contiguous(), weight.scales.T)
        for name, weight in weights.items()
    }
    return write_quantized_folder(model, tokenizer, packed, quantization_config, output, "AWQ")


def is_awq_config(config: dict) -> bool:
    quant = config.get("quantization_config") or {}
    return quant.get("quant_method") == "awq"


def load_awq_model(folder: Path, weight_files: list[Path], dtype: torch.dtype) -> nn.Module:
    """Build the model in `folder` with its quantized linears as `AWQLinear` modules.

    Raises:
        MemtoolError: a version other than GEMM, bits other than 4, or tensors that do not
            match the config.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    quant = config.quantization_config
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    version = str(quant.get("version") or quant.get("format") or "gemm").lower()
    if version != "gemm":
        raise MemtoolError(
            f"{folder} is AWQ version {version!r}; memtool reads the GEMM layout only"
        )
    if int(quant.get("bits", quant.get("w_bit", AWQ_BITS))) != AWQ_BITS:
        raise MemtoolError(f"{folder} says AWQ with {quant.get('bits')} bits; GEMM is 4-bit")
    del config.quantization_config
    return load_quantized_folder(
        folder, config, weight_files, dtype, "AWQ", AWQ_KEYS, AWQLinear.from_tensors
    )
