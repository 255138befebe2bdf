"""The dtype calibration forwards run their matmuls in (BitStack statistics, GPTQ passes).

bfloat16 halves the cost of a forward where the hardware multiplies it natively (CUDA; CPUs with
AVX512-BF16 or AMX), and is emulated, slower than float32, elsewhere (AVX2-only CPUs): "auto"
asks the hardware. What is accumulated from the forwards (Hessians, norms, Fisher) stays float32
whatever runs the matmuls.
"""

import contextlib

import torch

from memtool.errors import MemtoolError

COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


def check_compute_dtype(option: str, setting: str) -> None:
    if setting not in COMPUTE_DTYPES:
        raise MemtoolError(f"{option} {setting!r} must be auto, float32 or bfloat16")


def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 natively (faster than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        return native or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return False


def resolve_compute_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a compute-dtype setting (None: the model's own float32)."""
    if setting == "float32":
        return None
    if setting == "bfloat16":
        return torch.bfloat16
    return torch.bfloat16 if native_bfloat16(device) else None


def dtype_name(dtype: torch.dtype | None) -> str:
    """What outputs record: "float32" for None."""
    return str(dtype or torch.float32).removeprefix("torch.")


def autocast_to(device_type: str, dtype: torch.dtype | None):
    """Autocast to `dtype` (a no-op context for None). No weight-cast cache: it would hold a
    16-bit copy of every weight the forwards touch (+270 MB peak on smollm2-135m) to save casts
    that cost little beside the matmuls they feed."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype, cache_enabled=False)
