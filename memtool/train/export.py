"""The consolidated Hugging Face export of a trained model, streamed tensor by tensor.

Under ZeRO the fp32 weights are spread over ranks; every rank walks the parameters together
(gathering one at a time), and rank 0 writes each into a single `model.safetensors` as it arrives
(`memtool.formats.safetensors_stream`), so no rank ever holds the whole model twice. Tied
parameters are written once under their first name; transformers re-ties them on load. The
folder appears through one atomic rename, with config.json and the tokenizer, loadable by
`memtool measure` / `memtool compress` and by transformers.
"""

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from memtool.atomic import atomic_dir
from memtool.formats.safetensors_stream import write_safetensors
from memtool.train.distributed import Dist


def _names(model: nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, param in model.named_parameters():  # deduplicates tied parameters
        names.setdefault(id(param), name)
    return names


def export_model(
    model: nn.Module,
    engine,
    tokenizer,
    dest: Path,
    dtype: torch.dtype,
    group: Dist,
    metadata: dict[str, str] | None = None,
) -> Path | None:
    """Write the model as a Hugging Face folder at `dest` (rank 0); collective.

    Args:
        engine: The run's `ZeroOptimizer` or `FSDPOptimizer` (it knows where the fp32 weights are).
        dtype: dtype of the exported weights.
    """
    names = _names(model)
    params = [p for p in model.parameters() if p.requires_grad]
    specs = [(names[id(p)], tuple(p.shape), dtype) for p in params]
    values = (value for _, value in engine.full_parameters(model))
    if not group.is_main:
        for _ in values:  # take part in the gathers
            pass
        dist.barrier()
        return None
    # An earlier export of this output folder is replaced only once this one is complete.
    with atomic_dir(dest, replace=True) as tmp:
        config = model.config
        config.dtype = dtype  # what the folder holds, for loaders that read it
        config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta = {"format": "pt", **(metadata or {})}
        write_safetensors(tmp / "model.safetensors", specs, values, meta)
    dist.barrier()
    return dest
