"""`info`: versions, devices, usable kernel backends and cache paths."""

import importlib.metadata
import os
import platform

from memtool import __version__
from memtool.models.builtin import BUILTIN_MODELS, MANIFEST, builtin_path
from memtool.paths import data_dir, memtool_home, models_dir

_PACKAGES = ("torch", "transformers", "safetensors", "accelerate", "bitsandbytes", "triton", "gguf")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _devices() -> list[dict]:
    import torch

    devices = [
        {
            "type": "cpu",
            "name": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
        }
    ]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            devices.append(
                {
                    "type": "cuda",
                    "index": index,
                    "name": props.name,
                    "memory_bytes": props.total_memory,
                }
            )
    return devices


def _backends() -> dict[str, dict]:
    """Each kernel backend's own check (memtool.ops), so `info` and dispatch never disagree,
    and the ops it implements."""
    import torch

    from memtool import ops

    device = "cuda" if torch.cuda.is_available() else "cpu"
    triton_usable, triton_note = ops.triton_status(device)
    cpu_usable, cpu_note = ops.cpu_status("cpu")  # builds the native kernel once if needed
    backends = {
        "reference": {"usable": True, "note": "pure PyTorch, every device"},
        "triton": {"usable": triton_usable, "note": triton_note},
        "cpu": {"usable": cpu_usable, "note": cpu_note},
    }
    for name, backend in backends.items():
        backend["ops"] = list(ops.OPS_BY_BACKEND[name])
    return backends


def environment_info() -> dict:
    """Everything `memtool info` shows, as plain data."""
    return {
        "memtool": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in _PACKAGES},
        "devices": _devices(),
        "kernel_backends": _backends(),
        "cache": {
            "home": str(memtool_home()),
            "home_from": "MEMTOOL_HOME" if os.environ.get("MEMTOOL_HOME") else "default",
            "models": str(models_dir()),
            "data": str(data_dir()),
        },
        "builtin_models": {
            name: {
                "cached": (builtin_path(name) / MANIFEST).exists(),
                "description": spec.description,
            }
            for name, spec in BUILTIN_MODELS.items()
        },
    }
