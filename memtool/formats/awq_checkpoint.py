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
from safetensors import safe_open
from torch import nn

from memtool import __version__
from memtool.errors import MemtoolError
from memtool.formats.awq_linear import AWQLinear
from memtool.formats.awq_pack import AWQ_BITS, pack_awq
from memtool.formats.checkpoint_io import write_quantized_folder
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
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

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
        raise MemtoolError(f"{folder} says it is AWQ but holds no qweight tensors")
    for name in quantized:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child, None)
        if not isinstance(linear, nn.Linear):
            raise MemtoolError(f"{folder}: {name}.qweight does not belong to a linear layer")
        parts = {key: state.pop(f"{name}.{key}") for key in AWQ_KEYS}
        if f"{name}.bias" in state:
            parts["bias"] = state.pop(f"{name}.bias").to(dtype)
        module = AWQLinear.from_tensors(parts)
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
