"""Building a flash store ready to serve: bundles, predictors, config and tokenizer, at once.

`memtool compress --method flash-store` and the first `serve-local --memory-budget` of a model
call `build_flash_store`; the folder appears complete or not at all (the store writer's atomic
rename covers the predictors and the config/tokenizer copies too).
"""

import hashlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from memtool.atomic import clean_stale_temporaries, file_lock
from memtool.data import calibration_windows
from memtool.errors import MemtoolError
from memtool.formats.flash_store import META_FILE, FlashStoreInfo, write_flash_store
from memtool.models import LoadedModel
from memtool.paths import locks_dir, memtool_home
from memtool.progress import console
from memtool.serve.flash.sparsity import DEFAULT_RECALL, calibrate_predictors, save_predictors


@dataclass(frozen=True)
class FlashStoreConfig:
    """How to build a store.

    Attributes:
        gate_resident: keep gate_proj (SwiGLU) or fc1 (ReLU) resident: exact selection (CATS
            thresholds, ReLU zeros), no predictor at run time.
        calib: calibration data spec for the thresholds and predictors.
        calib_samples: calibration windows.
        seq_len: tokens per window.
        predictor: "quant:BITS" or "lowrank:RANK" (None: quant:4 for SwiGLU, lowrank:H/16
            for ReLU; see `memtool.serve.flash.sparsity`).
        recall: share of truly active neurons each layer's predictor must keep.
        seed: seed of the calibration draw.
    """

    gate_resident: bool = False
    calib: str = "wiki"
    calib_samples: int = 16
    seq_len: int = 256
    predictor: str | None = None
    recall: float = DEFAULT_RECALL
    seed: int = 0


def build_flash_store(
    loaded: LoadedModel,
    folder: Path,
    config: FlashStoreConfig = FlashStoreConfig(),
    *,
    input_ids: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    show: bool = True,
) -> tuple[FlashStoreInfo, dict]:
    """Write `loaded` as a flash store with its predictors into `folder` (must not exist).

    Args:
        loaded: the model (float32 gives the most accurate calibration) and tokenizer.
        folder: the store folder.
        config: store options.
        input_ids: calibration windows [n, seq_len] to use instead of `config.calib`.
        dtype: store dtype (default: bfloat16 for float32 models, else the model's).
        show: progress bars.

    Returns:
        (what the store writer wrote, the predictors' metadata).
    """
    folder = Path(folder)
    if folder.exists():
        raise MemtoolError(f"{folder} already exists: remove it or choose another folder")
    calibration: dict = {"data": "given token ids"}
    if input_ids is None:
        if loaded.tokenizer is None:
            raise MemtoolError("the model has no tokenizer: pass calibration token ids")
        windows = calibration_windows(
            config.calib, loaded.tokenizer, config.calib_samples, config.seq_len, config.seed
        )
        input_ids = windows.input_ids
        # the data, split, seed and text fingerprint, as every other calibrated output names them
        calibration = windows.to_dict()
    if dtype is None:
        first = next(p.dtype for p in loaded.model.parameters())
        dtype = first if first in (torch.float16, torch.bfloat16) else torch.bfloat16
    tensors, meta = calibrate_predictors(
        loaded.model,
        input_ids,
        predictor=config.predictor,
        recall=config.recall,
        dtype=dtype,
        show=show,
    )
    meta["calibration"] = {**calibration, "tokens": int(input_ids.numel())}

    def extra(tmp: Path) -> None:
        save_predictors(tmp, tensors, meta)
        generation = getattr(loaded.model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(tmp)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)

    info = write_flash_store(
        loaded.model,
        folder,
        gate_resident=config.gate_resident,
        dtype=dtype,
        source=str(loaded.source),
        extra=extra,
    )
    return info, meta


def compress_flash_store(
    source: str | None, output: Path, config: FlashStoreConfig, show: bool = True
) -> dict:
    """`memtool compress --method flash-store`: load `source` in float32, build the store in
    `output`; returns the CLI's JSON summary."""
    from memtool.models import load_model

    output = Path(output)
    if output.exists():
        raise MemtoolError(f"{output} already exists: remove it or choose another folder")
    began = time.perf_counter()
    loaded = load_model(source, dtype="float32")
    info, meta = build_flash_store(loaded, output, config, show=show)
    return {
        "output": str(output),
        "method": "flash-store",
        "kind": info.kind,
        "dtype": str(info.dtype).removeprefix("torch."),
        "layers": info.n_layers,
        "ffn_bytes": info.ffn_bytes,
        "resident_bytes": info.resident_bytes,
        # A resident gate selects exactly: the fitted predictors stay in the store (its
        # thresholds are read from their file) but serving uses none.
        "predictor": "none (gate resident)" if config.gate_resident else meta["predictor"],
        "recall": meta["recall"],
        "calibration": meta["calibration"],
        "settings": asdict(config),
        "seconds": time.perf_counter() - began,
    }


def is_flash_store(path: Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def ensure_flash_store(source: str | None, show: bool = True) -> Path:
    """The store to serve `source` from: `source` itself when it is a store folder, else the
    cached store of that model, built on first use (built-in names and local folders only).

    The cache key hashes the model's weight files' names, sizes and modification times, so a
    changed model gets a new store instead of a stale one.
    """
    from memtool.models.builtin import BUILTIN_MODELS, DEFAULT_MODEL, ensure_builtin

    text = source or DEFAULT_MODEL
    if is_flash_store(Path(text).expanduser()):
        return Path(text).expanduser()
    if text in BUILTIN_MODELS:
        model_dir = ensure_builtin(text)
    elif Path(text).expanduser().is_dir():
        model_dir = Path(text).expanduser().resolve()
    else:
        raise MemtoolError(
            f"{text}: streaming needs a flash store; build one with memtool compress {text} "
            "--method flash-store -o DIR, then serve DIR"
        )
    digest = hashlib.sha256(str(model_dir).encode())
    for path in [*sorted(model_dir.glob("*.safetensors")), model_dir / "config.json"]:
        stat = path.stat()
        digest.update(f"{path.name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    dest = memtool_home() / "flash-stores" / f"{model_dir.name}-{digest.hexdigest()[:12]}"
    if is_flash_store(dest):
        return dest
    with file_lock(locks_dir() / f"flash-store-{dest.name}.lock"):
        if is_flash_store(dest):  # another process built it while we waited
            return dest
        clean_stale_temporaries(dest.parent, dest.name)
        if show:
            console.print(f"[bold]Building the flash store of {text} (once): {dest}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        compress_flash_store(text, dest, FlashStoreConfig(), show=show)
    return dest
