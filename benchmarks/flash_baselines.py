"""Baselines for the flash-streaming benchmark: what the engine must beat, each one measured.

Imported by `benchmarks/flash_serve.py` (through a `sys.path` insert of this folder). Every
number these functions return comes from a clock or a kernel counter, never from a model of
the hardware:

- `drop_file_cache`: evicts files' clean pages, so page-cache-based systems pay for storage again;
- `make_synthetic_opt`: an OPT checkpoint at real shapes (random weights, fc1 biases set so that
  about `active_fraction` of the ReLU inputs are positive, like a trained OPT's sparse FFN);
- `run_accelerate_offload`: transformers + accelerate with part of the model offloaded to disk;
- `run_in_memory`: the whole model in RAM, the ceiling;
- `read_microbenchmark`: plain parallel random reads, the storage's own ceiling;
- `naive_stream_decode`: every decoder layer re-read from storage (O_DIRECT) for every token.

Bytes "read from storage" are `/proc/self/io` `read_bytes` deltas: the bytes this process made
the block layer read (page-cache hits do not count, O_DIRECT and mmap faults do). `rchar` counts
bytes passed through read()-like calls whatever their source, and misses mmap faults.

Self-test: python benchmarks/flash_baselines.py [--smollm2] [--build-opt FOLDER]
"""

import argparse
import contextlib
import copy
import functools
import gc
import hashlib
import json
import mmap
import os
import random
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, OPTConfig

from memtool.models.layers import decoder_layers
from memtool.serve.flash.engine import greedy_steps

ALIGN_BYTES = 4096  # page size: O_DIRECT buffers, offsets and lengths all sit on this grid
DISK_BUDGET_BYTES = 1 << 40  # "unlimited" disk for accelerate's device map
ATTENTION = "sdpa"  # one attention kernel for every system, so greedy ids can be compared

OPT_SHAPES = {
    "opt-1.3b": dict(
        hidden_size=2048,
        num_hidden_layers=24,
        num_attention_heads=32,
        ffn_dim=8192,
        vocab_size=50272,
        max_position_embeddings=2048,
    ),
    "opt-2.7b": dict(
        hidden_size=2560,
        num_hidden_layers=32,
        num_attention_heads=32,
        ffn_dim=10240,
        vocab_size=50272,
        max_position_embeddings=2048,
    ),
    "opt-tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=256,
        vocab_size=1000,
        max_position_embeddings=2048,
    ),
}
WEIGHT_STD = 0.02
SHARD_BYTES = 1_000_000_000
SYNTHETIC_MANIFEST = "memtool-synthetic.json"


# ---------------------------------------------------------------------------------------------
# Kernel counters


def _regular_files(paths: Iterable[Path]) -> list[Path]:
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(p for p in sorted(path.rglob("*")) if p.is_file())
        elif path.is_file():
            files.append(path)
    return files


def drop_file_cache(paths: Iterable[Path]) -> None:
    """Evict every regular file under `paths` (folders recursively) from the page cache.

    POSIX_FADV_DONTNEED drops clean pages only, so dirty ones are written back first
    (`fdatasync`; instant for files nobody wrote). Pages that some process has mapped stay:
    a system that mmaps its resident weights keeps them, which is what "resident" means.
    """
    for path in _regular_files(paths):
        fd = os.open(path, os.O_RDONLY)
        try:
            # A file system may refuse to sync a read-only descriptor; eviction still helps.
            with contextlib.suppress(OSError):
                os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _io_counters() -> dict[str, int]:
    """This process's `read_bytes` (block-device reads) and `rchar` (read()-call bytes)."""
    with open("/proc/self/io") as handle:
        fields = dict(line.split(":") for line in handle if ":" in line)
    return {"read_bytes": int(fields["read_bytes"]), "rchar": int(fields["rchar"])}


def _status_bytes(field: str) -> int:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM, RssAnon, RssFile), in bytes."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Reset VmHWM (Linux >= 4.0), so a peak measures this call and not earlier ones."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def _memory_report(peak_was_reset: bool, rss_before_bytes: int) -> dict:
    """Peak RSS of the call (process-lifetime `ru_maxrss` when the reset failed), and now.

    RSS counts file-backed pages too: a model whose weights are mmapped from the checkpoint
    (transformers does this for CPU weights) shows them as `rss_file_bytes`.
    """
    if peak_was_reset:
        peak_rss_bytes = _status_bytes("VmHWM")
    else:
        peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "peak_rss_bytes": peak_rss_bytes,
        "peak_rss_since_call": peak_was_reset,
        "rss_before_bytes": rss_before_bytes,
        "rss_anon_bytes": _status_bytes("RssAnon"),
        "rss_file_bytes": _status_bytes("RssFile"),
    }


# ---------------------------------------------------------------------------------------------
# The decode loop every system shares


@torch.inference_mode()
def _greedy_decode(
    model: nn.Module,
    prompt_ids: list[int],
    new_tokens: int,
    before_token: Callable[[], None] | None = None,
    counters: Callable[[], dict[str, float]] | None = None,
) -> dict:
    """Greedily generate `new_tokens` tokens, one forward each, and measure every forward.

    The first forward (the prefill) produces the first token; tokens/s covers the other
    `new_tokens - 1` forwards only. `before_token` (cache eviction) runs before every forward,
    outside the timed span, its seconds reported apart. `counters` returns cumulative numbers
    (bytes a reader read, ...) sampled around each forward like `/proc/self/io`.
    """

    def sampled() -> dict[str, float]:
        return {**_io_counters(), **(counters() if counters else {})}

    steps = greedy_steps(model, prompt_ids, new_tokens, before_token, sampled)
    token_ids = [int(step.pop("token")) for step in steps]
    evict_seconds = sum(step.pop("before_seconds") for step in steps)
    prefill, decode = steps[0], steps[1:]
    decode_seconds = sum(step["seconds"] for step in decode)
    result = {
        "token_ids": token_ids,
        "prompt_tokens": len(prompt_ids),
        "new_tokens": new_tokens,
        "prefill_seconds": prefill["seconds"],
        "decode_tokens": len(decode),
        "decode_seconds": decode_seconds,
        "tokens_per_s": len(decode) / decode_seconds if decode else None,
        "decode_seconds_per_token": [step["seconds"] for step in decode],
        "evict_seconds": evict_seconds,
    }
    for key in prefill:
        if key == "seconds":
            continue
        result[f"prefill_{key}"] = prefill[key]
        result[f"{key}_per_token"] = statistics.fmean(s[key] for s in decode) if decode else None
    return result


def _parameter_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters, tied ones counted once (meta ones included)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Synthetic OPT checkpoints


def _synthetic_tensor(
    name: str, shape: torch.Size, dtype: torch.dtype, generator: torch.Generator, fc1_bias: float
) -> torch.Tensor:
    """One weight of the synthetic OPT, built directly in `dtype` (never a full fp32 model)."""
    if name.endswith("layer_norm.weight"):
        return torch.ones(shape, dtype=dtype)
    if name.endswith("fc1.bias"):
        return torch.full(shape, fc1_bias, dtype=dtype)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype)
    return torch.empty(shape, dtype=dtype).normal_(0.0, WEIGHT_STD, generator=generator)


def make_synthetic_opt(
    folder: Path,
    shape: str = "opt-1.3b",
    active_fraction: float = 0.1,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    *,
    shard_bytes: int = SHARD_BYTES,
) -> Path:
    """Write a loadable `OPTForCausalLM` folder at real shapes with random weights.

    Flash streaming exploits the sparsity of OPT's ReLU FFN, which random weights lack, so the
    fc1 biases put it back: LayerNorm output has unit variance per channel (its weight is 1),
    so with fc1 weights ~N(0, 0.02²) a pre-activation is ~N(bias, (0.02·√hidden)²), and a bias
    of -Φ⁻¹(1 - active_fraction)·0.02·√hidden leaves `active_fraction` of them positive
    (`measure_fc1_active_fraction` checks it). Tensors are generated one at a time and written
    in safetensors shards of <= `shard_bytes`, so RAM holds one shard, not the model (opt-1.3b
    in fp16: 2.63 GB in 3 shards, 1.39 GB peak RSS, ~20 s on 2 cores). A manifest written
    last marks a complete folder: calling again with the same arguments returns at once.
    """
    if shape not in OPT_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(OPT_SHAPES)}")
    if not 0.0 < active_fraction < 1.0:
        raise ValueError("active_fraction must be in (0, 1)")
    folder = Path(folder)
    params = {
        "shape": shape,
        "active_fraction": active_fraction,
        "seed": seed,
        "dtype": str(dtype).removeprefix("torch."),
        "shard_bytes": shard_bytes,
    }
    manifest = folder / SYNTHETIC_MANIFEST
    if manifest.exists() and json.loads(manifest.read_text()) == params:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [manifest, *folder.glob("*.safetensors"), *folder.glob("*.index.json")]:
        stale.unlink(missing_ok=True)

    dims = OPT_SHAPES[shape]
    config = OPTConfig(
        **dims,
        word_embed_proj_dim=dims["hidden_size"],
        do_layer_norm_before=True,
        activation_function="relu",
        dtype=params["dtype"],
        architectures=["OPTForCausalLM"],
    )
    config.save_pretrained(folder)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tied = set(getattr(skeleton, "all_tied_weights_keys", {}) or {})
    shapes = {name: t.shape for name, t in skeleton.state_dict().items() if name not in tied}
    del skeleton

    preactivation_std = WEIGHT_STD * dims["hidden_size"] ** 0.5
    fc1_bias = -statistics.NormalDist().inv_cdf(1.0 - active_fraction) * preactivation_std
    generator = torch.Generator().manual_seed(seed)
    shards: list[list[str]] = [[]]
    bytes_per_shard = [0]
    for name, tensor_shape in shapes.items():
        nbytes = tensor_shape.numel() * dtype.itemsize
        if shards[-1] and bytes_per_shard[-1] + nbytes > shard_bytes:
            shards.append([])
            bytes_per_shard.append(0)
        shards[-1].append(name)
        bytes_per_shard[-1] += nbytes

    weight_map = {}
    for index, names in enumerate(shards, start=1):
        filename = (
            "model.safetensors"
            if len(shards) == 1
            else f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        )
        tensors = {n: _synthetic_tensor(n, shapes[n], dtype, generator, fc1_bias) for n in names}
        save_file(tensors, folder / filename, metadata={"format": "pt"})
        del tensors
        weight_map.update(dict.fromkeys(names, filename))
    if len(shards) > 1:
        index_json = {"metadata": {"total_size": sum(bytes_per_shard)}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    manifest.write_text(json.dumps(params, indent=2))
    return folder


@torch.inference_mode()
def measure_fc1_active_fraction(
    model_folder: Path, token_ids: list[int], dtype: torch.dtype = torch.float32
) -> list[float]:
    """Per decoder layer, the fraction of fc1 outputs (ReLU inputs) > 0 on one forward."""
    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=dtype).eval()
    fractions: list[float] = []
    hooks = [
        layer.fc1.register_forward_hook(
            lambda module, args, out: fractions.append((out > 0).float().mean().item())
        )
        for layer in decoder_layers(model)
    ]
    try:
        model(input_ids=torch.tensor([token_ids]), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return fractions


# ---------------------------------------------------------------------------------------------
# transformers + accelerate disk offload, and the whole model in RAM


def _weight_bytes_by_device(model: nn.Module) -> dict[str, int]:
    """Parameter bytes per `hf_device_map` device ("cpu", "disk"), by longest module prefix."""
    device_map = getattr(model, "hf_device_map", None) or {"": "cpu"}
    prefixes = sorted(device_map, key=len, reverse=True)
    totals: dict[str, int] = {}
    for name, param in model.named_parameters():
        prefix = next(p for p in prefixes if p == "" or name == p or name.startswith(p + "."))
        device = str(device_map[prefix])
        totals[device] = totals.get(device, 0) + param.numel() * param.element_size()
    return totals


def _offload_sources(model: nn.Module) -> list[str]:
    """The files accelerate's hooks load offloaded weights from (checkpoint or .dat files)."""
    sources: set[str] = set()
    seen: set[int] = set()
    for module in model.modules():
        weights_map = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        dataset = getattr(weights_map, "dataset", None)
        if dataset is None or id(dataset) in seen:
            continue
        seen.add(id(dataset))
        for key, info in getattr(dataset, "index", {}).items():
            if info.get("safetensors_file"):
                sources.add(str(info["safetensors_file"]))
            else:
                sources.add(str(Path(dataset.save_folder) / f"{key}.dat"))
    return sorted(sources)


def _checkpoint_files(model_folder: Path) -> list[Path]:
    return sorted(Path(model_folder).glob("*.safetensors"))


def run_accelerate_offload(
    model_folder: Path,
    budget_bytes: int,
    prompt_ids: list[int],
    new_tokens: int,
    offload_folder: Path,
    evict: bool = True,
    dtype: torch.dtype = torch.bfloat16,
) -> dict:
    """Greedy decoding with transformers' `device_map="auto"`: `budget_bytes` of weights in
    RAM, the rest offloaded to disk and loaded by accelerate's hooks for every forward.

    With safetensors checkpoints transformers 5 offloads nothing into `offload_folder`: its
    disk index points at the checkpoint itself, so accelerate re-reads the offloaded tensors
    straight from the model's .safetensors files (`offload_sources` says which files). With
    `evict`, both the checkpoint and the offload folder leave the page cache before every
    forward, the prefill included, so each token pays storage reads (a cold page cache);
    without it, the page cache serves the re-reads after the first token.

    Eviction cannot drop pages some mapping holds: transformers mmaps the checkpoint for the
    RAM-resident tensors, and that mapping also maps a few neighbouring pages of offloaded
    tensors (on smollm2-135m at a 50% budget, mincore showed 10.0 of the 141.6 MB offloaded
    still cached after eviction), so accelerate re-reads slightly less than its disk share.
    """
    model_folder, offload_folder = Path(model_folder), Path(offload_folder)
    offload_folder.mkdir(parents=True, exist_ok=True)
    evict_paths = [*_checkpoint_files(model_folder), offload_folder]
    drop_file_cache(evict_paths)
    gc.collect()
    peak_was_reset = _reset_peak_rss()
    rss_before_bytes = _status_bytes("VmRSS")
    io_before = _io_counters()
    began = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        model_folder,
        dtype=dtype,
        device_map="auto",
        max_memory={"cpu": int(budget_bytes), "disk": DISK_BUDGET_BYTES},
        offload_folder=offload_folder,
        attn_implementation=ATTENTION,
    ).eval()
    load_seconds = time.perf_counter() - began
    load_read_bytes = _io_counters()["read_bytes"] - io_before["read_bytes"]
    weight_bytes = _weight_bytes_by_device(model)
    sources = _offload_sources(model)
    offload_files = _regular_files([offload_folder])
    try:
        decode = _greedy_decode(
            model,
            prompt_ids,
            new_tokens,
            before_token=functools.partial(drop_file_cache, evict_paths) if evict else None,
        )
        memory = _memory_report(peak_was_reset, rss_before_bytes)
    finally:
        del model
        gc.collect()
    return {
        "system": "accelerate-offload",
        "evict": evict,
        "dtype": str(dtype).removeprefix("torch."),
        "budget_bytes": int(budget_bytes),
        "weight_bytes_by_device": weight_bytes,
        "weight_bytes_on_disk": weight_bytes.get("disk", 0),
        "weight_bytes_on_cpu": weight_bytes.get("cpu", 0),
        "offload_sources": sources,
        "offload_folder_files": len(offload_files),
        "offload_folder_bytes": sum(p.stat().st_size for p in offload_files),
        "load_seconds": load_seconds,
        "load_read_bytes": load_read_bytes,
        **decode,
        **memory,
    }


def run_in_memory(
    model_folder: Path,
    prompt_ids: list[int],
    new_tokens: int,
    dtype: torch.dtype = torch.bfloat16,
) -> dict:
    """Greedy decoding with every weight in RAM: the speed ceiling, and the reference ids."""
    gc.collect()
    peak_was_reset = _reset_peak_rss()
    rss_before_bytes = _status_bytes("VmRSS")
    began = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        model_folder, dtype=dtype, attn_implementation=ATTENTION
    ).eval()
    load_seconds = time.perf_counter() - began
    try:
        decode = _greedy_decode(model, prompt_ids, new_tokens)
        memory = _memory_report(peak_was_reset, rss_before_bytes)
        weight_bytes = _parameter_bytes(model)
    finally:
        del model
        gc.collect()
    return {
        "system": "in-memory",
        "dtype": str(dtype).removeprefix("torch."),
        "weight_bytes": weight_bytes,
        "load_seconds": load_seconds,
        **decode,
        **memory,
    }


# ---------------------------------------------------------------------------------------------
# Plain parallel reads


def _open_direct(path: Path) -> tuple[int, bool]:
    """A read descriptor with O_DIRECT when the file system allows it, else a buffered one."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT), True
    except OSError:
        return os.open(path, os.O_RDONLY), False


def read_microbenchmark(
    path: Path,
    read_bytes: int,
    threads: int,
    total_bytes: int = 256 << 20,
    direct: bool = True,
    seed: int = 0,
) -> dict:
    """Random positional reads of `read_bytes` each on `threads` threads: what the storage
    itself delivers, the ceiling any streaming engine's reads are compared against.

    Offsets are random multiples of 4096 inside the file; each thread reads with `os.preadv`
    into its own page-aligned buffer (an anonymous mmap, as O_DIRECT requires). O_DIRECT
    bypasses the page cache; where it is refused, the file is read buffered after dropping its
    cache, and `direct` says False (repeated offsets may then hit the cache).
    """
    path = Path(path)
    if direct:
        read_bytes = -(-read_bytes // 512) * 512  # O_DIRECT lengths: whole logical blocks
        fd, direct = _open_direct(path)
    else:
        fd = os.open(path, os.O_RDONLY)
    try:
        if not direct:
            drop_file_cache([path])
        file_bytes = os.fstat(fd).st_size
        if file_bytes < read_bytes:
            raise ValueError(f"{path} has {file_bytes} bytes, fewer than one read")
        rng = random.Random(seed)
        last_slot = (file_bytes - read_bytes) // ALIGN_BYTES
        reads = max(threads, total_bytes // read_bytes)
        offsets = [rng.randint(0, last_slot) * ALIGN_BYTES for _ in range(reads)]
        buffers = [
            mmap.mmap(-1, -(-read_bytes // ALIGN_BYTES) * ALIGN_BYTES) for _ in range(threads)
        ]

        def worker(index: int) -> int:
            target = [memoryview(buffers[index])[:read_bytes]]
            done = 0
            for offset in offsets[index::threads]:
                got = os.preadv(fd, target, offset)
                if got != read_bytes:
                    raise OSError(f"short read at {offset}: {got} of {read_bytes} bytes")
                done += got
            return done

        io_before = _io_counters()
        began = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            bytes_read = sum(pool.map(worker, range(threads)))
        seconds = time.perf_counter() - began
        device_read_bytes = _io_counters()["read_bytes"] - io_before["read_bytes"]
        for buffer in buffers:
            buffer.close()
    finally:
        os.close(fd)
    return {
        "read_bytes": read_bytes,
        "threads": threads,
        "reads": reads,
        "seconds": seconds,
        "mb_per_s": bytes_read / seconds / 1e6,
        "iops": reads / seconds,
        "direct": direct,
        "bytes_read": bytes_read,
        "device_read_bytes": device_read_bytes,
    }


# ---------------------------------------------------------------------------------------------
# Naive streaming: every decoder layer re-read for every token


def _align(value: int) -> int:
    return -(-value // ALIGN_BYTES) * ALIGN_BYTES


def _checkpoint_index(model_folder: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the .safetensors file holding it."""
    index_file = Path(model_folder) / "model.safetensors.index.json"
    if index_file.exists():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        return {name: Path(model_folder) / file for name, file in weight_map.items()}
    index = {}
    for file in _checkpoint_files(model_folder):
        with safe_open(file, framework="pt") as handle:
            index.update(dict.fromkeys(handle.keys(), file))
    return index


def _checkpoint_key(name: str, index: dict[str, Path], base_prefix: str) -> str | None:
    """The checkpoint's name for model tensor `name` (older checkpoints omit the base prefix)."""
    for key in (name, name.removeprefix(base_prefix + "."), f"{base_prefix}.{name}"):
        if key in index:
            return key
    return None


class _CheckpointReader:
    """Reads single tensors from a (possibly sharded) safetensors checkpoint."""

    def __init__(self, model_folder: Path, base_prefix: str) -> None:
        self.index = _checkpoint_index(model_folder)
        self.base_prefix = base_prefix
        self.handles: dict[Path, object] = {}

    def key(self, name: str) -> str | None:
        return _checkpoint_key(name, self.index, self.base_prefix)

    def get(self, name: str) -> torch.Tensor:
        key = self.key(name)
        if key is None:
            raise KeyError(f"{name} is not in the checkpoint")
        file = self.index[key]
        if file not in self.handles:
            self.handles[file] = safe_open(file, framework="pt")
        return self.handles[file].get_tensor(key)


def _layer_layouts(layers: nn.ModuleList) -> list[list[tuple[str, tuple[int, ...], int, int]]]:
    """Per layer, (parameter name, shape, offset in the layer's region, bytes), 4096-aligned."""
    layouts = []
    for layer in layers:
        if any(True for _ in layer.buffers()):
            raise NotImplementedError("decoder layers with buffers are not supported")
        layout, offset = [], 0
        for name, param in layer.named_parameters():
            nbytes = param.numel() * param.element_size()
            layout.append((name, tuple(param.shape), offset, nbytes))
            offset = _align(offset + nbytes)
        layouts.append(layout)
    return layouts


def _write_layer_file(
    reader: _CheckpointReader,
    layers_name: str,
    layouts: list[list[tuple[str, tuple[int, ...], int, int]]],
    dtype: torch.dtype,
    path: Path,
) -> list[tuple[int, int]]:
    """Write every layer's weights (in `dtype`) into one flat file, one aligned region each.

    Returns each layer's (file offset, region bytes). The file is synced and dropped from the
    page cache, so it starts cold.
    """
    regions, offset = [], 0
    partial = path.with_suffix(".partial")
    with open(partial, "wb") as handle:
        for index, layout in enumerate(layouts):
            region_bytes = _align(max(off + n for _, _, off, n in layout))
            region = torch.zeros(region_bytes, dtype=torch.uint8)
            for name, shape, off, nbytes in layout:
                source = reader.get(f"{layers_name}.{index}.{name}")
                region[off : off + nbytes].view(dtype).view(shape).copy_(source)
            handle.write(memoryview(region.numpy()))
            regions.append((offset, region_bytes))
            offset += region_bytes
        handle.flush()
        os.fsync(handle.fileno())
    partial.rename(path)
    drop_file_cache([path])
    return regions


class _LayerStreamer:
    """Reads layer i's region into the one staging buffer, O_DIRECT, in parallel pieces."""

    def __init__(
        self,
        path: Path,
        regions: list[tuple[int, int]],
        staging: mmap.mmap,
        threads: int,
        piece_bytes: int,
    ) -> None:
        self.path = path
        self.regions = regions
        self.view = memoryview(staging)
        self.piece_bytes = _align(piece_bytes)
        self.fd, self.direct = _open_direct(path)
        self.pool = ThreadPoolExecutor(threads)
        self.bytes_read = 0
        self.read_seconds = 0.0

    def _read_piece(self, file_offset: int, start: int, nbytes: int) -> None:
        got = os.preadv(self.fd, [self.view[start : start + nbytes]], file_offset + start)
        if got != nbytes:
            raise OSError(f"short read in {self.path}: {got} of {nbytes} bytes")

    def read_layer(self, index: int, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook of layer `index`: its weights arrive just before it runs."""
        file_offset, region_bytes = self.regions[index]
        began = time.perf_counter()
        starts = range(0, region_bytes, self.piece_bytes)
        sizes = [min(self.piece_bytes, region_bytes - start) for start in starts]
        list(self.pool.map(functools.partial(self._read_piece, file_offset), starts, sizes))
        self.read_seconds += time.perf_counter() - began
        self.bytes_read += region_bytes

    def counters(self) -> dict[str, float]:
        return {"reader_bytes": self.bytes_read, "reader_seconds": self.read_seconds}

    def close(self) -> None:
        self.pool.shutdown()
        self.view.release()
        os.close(self.fd)


def _build_resident_model(
    model_folder: Path, dtype: torch.dtype
) -> tuple[nn.Module, nn.ModuleList, str, _CheckpointReader]:
    """The model with its non-layer weights loaded and its decoder layers on the meta device.

    Built as a 0-layer model (real, small) plus the layers of a meta-device twin, so RAM never
    holds the decoder layers' weights and non-persistent buffers (rotary tables) are real.
    """
    config = AutoConfig.from_pretrained(model_folder)
    with torch.device("meta"):
        twin = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=ATTENTION)
    meta_layers = decoder_layers(twin)
    layers_name = next(name for name, module in twin.named_modules() if module is meta_layers)

    empty_config = copy.deepcopy(config)
    empty_config.num_hidden_layers = 0
    if getattr(empty_config, "layer_types", None) is not None:
        empty_config.layer_types = []
    model = AutoModelForCausalLM.from_config(
        empty_config, dtype=dtype, attn_implementation=ATTENTION
    )
    model.config.num_hidden_layers = config.num_hidden_layers
    if getattr(config, "layer_types", None) is not None:
        model.config.layer_types = config.layer_types
    layers = model.get_submodule(layers_name)
    layers.extend(list(meta_layers))
    del twin

    reader = _CheckpointReader(model_folder, model.base_model_prefix)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name.startswith(layers_name + "."):
                continue
            if reader.key(name) is None:
                if name in tied:
                    continue  # shares the tensor it is tied to, loaded under that name
                raise KeyError(f"{name} is not in the checkpoint of {model_folder}")
            tensor.copy_(reader.get(name))
    return model.eval(), layers, layers_name, reader


def naive_stream_decode(
    model_folder: Path,
    prompt_ids: list[int],
    new_tokens: int,
    dtype: torch.dtype = torch.bfloat16,
    work_folder: Path | None = None,
    threads: int = 4,
    piece_bytes: int = 4 << 20,
) -> dict:
    """Greedy decoding that re-reads every decoder layer from storage for every token.

    Resident: embeddings, positional embeddings, final norm and lm_head. The decoder layers
    live in `layers.bin` (written once per model and dtype under `work_folder`, reused while
    the checkpoint is unchanged), one 4096-aligned region per layer. Every layer's parameters
    are views into one staging buffer the size of the largest layer; a forward pre-hook reads
    the layer's region into it with O_DIRECT `preadv` on `threads` threads, `piece_bytes` each,
    just before the layer runs. No prefetch, no cache, no sparsity: the naive baseline.
    """
    model_folder = Path(model_folder)
    dtype_name = str(dtype).removeprefix("torch.")
    checkpoint = [
        (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in _checkpoint_files(model_folder)
    ]
    if work_folder is None:
        digest = hashlib.sha256(f"{model_folder.resolve()}|{dtype_name}".encode()).hexdigest()
        work_folder = Path(tempfile.gettempdir()) / "flash_naive" / digest[:16]
    work_folder = Path(work_folder)
    work_folder.mkdir(parents=True, exist_ok=True)

    gc.collect()
    peak_was_reset = _reset_peak_rss()
    rss_before_bytes = _status_bytes("VmRSS")
    began = time.perf_counter()
    model, layers, layers_name, reader = _build_resident_model(model_folder, dtype)
    resident_weight_bytes = sum(
        p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta"
    )
    layouts = _layer_layouts(layers)
    layer_file = work_folder / "layers.bin"
    manifest_file = work_folder / "layers.json"
    manifest = {"checkpoint": checkpoint, "dtype": dtype_name, "layouts": layouts}
    manifest = json.loads(json.dumps(manifest))  # tuples as lists, to compare with the file
    stored = json.loads(manifest_file.read_text()) if manifest_file.exists() else None
    if layer_file.exists() and stored is not None and stored["manifest"] == manifest:
        regions = [tuple(region) for region in stored["regions"]]
    else:
        manifest_file.unlink(missing_ok=True)
        regions = _write_layer_file(reader, layers_name, layouts, dtype, layer_file)
        manifest_file.write_text(json.dumps({"manifest": manifest, "regions": regions}))
    reader.handles.clear()
    drop_file_cache([layer_file])

    staging_bytes = max(region_bytes for _, region_bytes in regions)
    staging = mmap.mmap(-1, staging_bytes)
    staging_tensor = torch.frombuffer(staging, dtype=torch.uint8)
    for layer, layout in zip(layers, layouts, strict=True):
        for name, shape, offset, nbytes in layout:
            module_name, _, leaf = name.rpartition(".")
            view = staging_tensor[offset : offset + nbytes].view(dtype).view(shape)
            setattr(layer.get_submodule(module_name), leaf, nn.Parameter(view, False))
    streamer = _LayerStreamer(layer_file, regions, staging, threads, piece_bytes)
    hooks = [
        layer.register_forward_pre_hook(functools.partial(streamer.read_layer, index))
        for index, layer in enumerate(layers)
    ]
    setup_seconds = time.perf_counter() - began
    try:
        decode = _greedy_decode(
            model,
            prompt_ids,
            new_tokens,
            # Buffered fallback only: O_DIRECT reads never touch the page cache.
            before_token=None
            if streamer.direct
            else functools.partial(drop_file_cache, [layer_file]),
            counters=streamer.counters,
        )
        memory = _memory_report(peak_was_reset, rss_before_bytes)
    finally:
        for hook in hooks:
            hook.remove()
        streamer.close()
        del model, layers, staging_tensor
        gc.collect()
        staging.close()
    return {
        "system": "naive-stream",
        "dtype": dtype_name,
        "direct": streamer.direct,
        "threads": threads,
        "piece_bytes": streamer.piece_bytes,
        "layer_file": str(layer_file),
        "layer_file_bytes": sum(region_bytes for _, region_bytes in regions),
        "staging_bytes": staging_bytes,
        "resident_weight_bytes": resident_weight_bytes,
        "setup_seconds": setup_seconds,
        **decode,
        **memory,
    }


# ---------------------------------------------------------------------------------------------
# Self-test


def _save_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """A random 4-layer Llama in bf16: the other architecture naive streaming must handle."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def _summary(result: dict) -> str:
    def mb(value: float | None) -> str:
        return "-" if value is None else f"{value / 1e6:.1f} MB"

    return (
        f"{result['system']:<18} {result['tokens_per_s'] or 0:.2f} tok/s, "
        f"prefill {result['prefill_seconds']:.2f} s, "
        f"read {mb(result['read_bytes_per_token'])}/token (block device), "
        f"peak RSS {mb(result['peak_rss_bytes'])}, ids {result['token_ids']}"
    )


def _self_test(scratch: Path) -> None:
    """Tiny models: naive and offloaded ids equal in-memory ids; the helpers all run."""
    generator = random.Random(0)
    # Small shards, so the sharded-checkpoint paths (index file) run too.
    opt = make_synthetic_opt(scratch / "opt-tiny", "opt-tiny", shard_bytes=200_000)
    assert (opt / "model.safetensors.index.json").exists()
    fractions = measure_fc1_active_fraction(opt, [generator.randrange(1000) for _ in range(256)])
    print("opt-tiny fc1 active fraction per layer:", [round(f, 3) for f in fractions])
    assert all(0.05 < f < 0.2 for f in fractions), fractions
    llama = _save_tiny_llama(scratch / "llama-tiny")

    for folder in (opt, llama):
        prompt = [generator.randrange(4, 1000) for _ in range(6)]
        memory = run_in_memory(folder, prompt, 8)
        reference = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.bfloat16, attn_implementation=ATTENTION
        ).eval()
        generated = reference.generate(
            torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False
        )[0, len(prompt) :].tolist()
        assert generated == memory["token_ids"], (generated, memory["token_ids"])
        naive = naive_stream_decode(folder, prompt, 8, work_folder=scratch / f"{folder.name}-nv")
        assert naive["token_ids"] == memory["token_ids"], (naive["token_ids"], memory)
        assert naive["reader_bytes_per_token"] == naive["layer_file_bytes"]
        checkpoint_bytes = sum(p.stat().st_size for p in _checkpoint_files(folder))
        print(f"{folder.name}: our loop == generate; naive ids == in-memory ids")
        for result in (memory, naive):
            print("  " + _summary(result))
        # At 50% accelerate puts all of opt-tiny on disk (it keeps room for the largest
        # module), so 90% exercises a cpu/disk split on OPT too. Tiny files stay cached whatever
        # we evict: transformers' mmap of the checkpoint ends up mapping all their pages.
        for fraction in (0.5, 0.9) if folder == opt else (0.5,):
            offload = run_accelerate_offload(
                folder,
                int(checkpoint_bytes * fraction),
                prompt,
                8,
                scratch / f"{folder.name}-offload",
            )
            assert offload["weight_bytes_on_disk"] > 0, offload["weight_bytes_by_device"]
            same = offload["token_ids"] == memory["token_ids"]
            print(
                f"  budget {fraction:.0%}: accelerate ids {'==' if same else '!='} in-memory ids;",
                "weight bytes by device",
                offload["weight_bytes_by_device"],
                f"from {len(offload['offload_sources'])} checkpoint file(s)",
            )
            print("  " + _summary(offload))

    scratch_file = scratch / "read-test.bin"
    with open(scratch_file, "wb") as handle:
        handle.write(os.urandom(64 << 20))
    drop_file_cache([scratch])
    bench = read_microbenchmark(scratch_file, 64 << 10, 8, total_bytes=32 << 20)
    print(
        "read microbenchmark:",
        {k: round(v, 1) if isinstance(v, float) else v for k, v in bench.items()},
    )


def _smollm2_run(new_tokens: int) -> None:
    """The default model: in-memory, accelerate offload (cold, 50% budget) and naive."""
    from memtool.models.builtin import ensure_builtin
    from memtool.models.loader import load_tokenizer

    folder = ensure_builtin("smollm2-135m")
    prompt = load_tokenizer(str(folder))("The capital of France is")["input_ids"]
    checkpoint_bytes = sum(p.stat().st_size for p in _checkpoint_files(folder))
    memory = run_in_memory(folder, prompt, new_tokens)
    with tempfile.TemporaryDirectory(prefix="flash_bench_") as scratch:
        offload = run_accelerate_offload(
            folder, checkpoint_bytes // 2, prompt, new_tokens, Path(scratch) / "offload"
        )
    naive = naive_stream_decode(folder, prompt, new_tokens)
    for result in (memory, offload, naive):
        print(_summary(result))
    print(
        "accelerate weight bytes by device:",
        offload["weight_bytes_by_device"],
        "offload sources:",
        offload["offload_sources"],
    )
    print(
        "naive reader bytes/token:",
        naive["reader_bytes_per_token"],
        "read seconds/token:",
        round(naive["reader_seconds_per_token"], 3),
    )
    print(
        "ids equal: offload",
        offload["token_ids"] == memory["token_ids"],
        "naive",
        naive["token_ids"] == memory["token_ids"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smollm2", action="store_true", help="also run the default model")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--build-opt", type=Path, help="build opt-1.3b here and report its cost")
    args = parser.parse_args()
    if args.build_opt:
        began = time.perf_counter()
        folder = make_synthetic_opt(args.build_opt)
        files = _regular_files([folder])
        print(
            f"built {folder} in {time.perf_counter() - began:.1f} s: "
            f"{sum(p.stat().st_size for p in files) / 1e9:.3f} GB on disk, "
            f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB"
        )
        return
    with tempfile.TemporaryDirectory(prefix="flash_baselines_") as scratch:
        began = time.perf_counter()
        _self_test(Path(scratch))
        print(f"self-test passed in {time.perf_counter() - began:.1f} s")
    if args.smollm2:
        _smollm2_run(args.new_tokens)


if __name__ == "__main__":
    main()
