"""Sharded, resumable training checkpoints.

A checkpoint is a folder `checkpoints/step-NNNNNN/` holding one safetensors file per rank (that
rank's optimizer shard: fp32 master weights and Adam moments, or for stage 3 its parameter and
moment shards; plus its RNG state) and `trainer.json` (step, tokens, losses, the run's config,
the world size, and a CRC32 of every rank file). Every rank writes its own file into one
temporary folder, which rank 0 renames into place once all have finished: a checkpoint is
either complete or absent, so an interrupt or a dying rank never leaves a half-written one.

Resuming needs the same model (its parameter names and shapes, fingerprinted in
`trainer.json`), data, sequence length, batch size, seed and optimizer settings (or it would not
continue the same run), and the same ZeRO stage, compute dtype, offload and optimizer bits (the
shards hold them); a mismatch, a missing or damaged file is a one-line error. On the same number
of ranks each rank reads its own file; on another number, every rank reads all of them and the
engine cuts its new shard from the rejoined state (`reshard`; not for 8-bit optimizer states,
whose block-wise quantization is cut with the shards).
"""

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from memtool.atomic import replace_dir
from memtool.errors import MemtoolError
from memtool.formats.checksums import file_crc32
from memtool.train.distributed import Dist

STATE_FILE = "trainer.json"
FORMAT = "memtool-train-checkpoint/1"


@dataclass
class TrainerState:
    step: int
    tokens: int
    losses: list[float]
    config: dict
    world_size: int
    source: str
    model_signature: str = ""  # `model_signature` of the trained model ("" before 2026-12-08)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def model_signature(model: torch.nn.Module) -> str:
    """A fingerprint of the model's parameter names and shapes: what a checkpoint's shards fit."""
    text = ";".join(f"{name}:{tuple(p.shape)}" for name, p in model.named_parameters())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# What a resumed run must share with the checkpoint to continue the same run (the shards fit
# other settings too, but the run would not be the one that was interrupted).
SAME_ON_RESUME = ("data", "seq_len", "batch_size", "seed")
OPTIM_SAME_ON_RESUME = ("lr", "betas", "eps", "weight_decay", "warmup_steps", "max_grad_norm")
SHARD_LAYOUT = ("zero", "compute_dtype", "offload_optimizer", "optimizer_bits")


def check_resumable(folder: Path, payload: dict, config: dict, signature: str) -> None:
    """Raise a one-line `MemtoolError` unless this run (`config`, model `signature`) continues
    the one that wrote checkpoint `folder`."""
    try:
        saved, step = payload["config"], int(payload["step"])
        saved_optim = saved["optim"]
        saved_signature = payload.get("model_signature", "")
    except (KeyError, TypeError, ValueError) as exc:
        raise MemtoolError(f"checkpoint {folder} is damaged: {STATE_FILE} lacks {exc}") from None
    if saved_signature and saved_signature != signature:
        raise MemtoolError(
            f"checkpoint {folder} was written for another model (its source: "
            f"{payload.get('source')}); resume with the same model"
        )
    differ = [(key, saved.get(key), config[key]) for key in (*SAME_ON_RESUME, *SHARD_LAYOUT)]
    optim = config["optim"]
    differ += [(key, saved_optim.get(key), optim[key]) for key in OPTIM_SAME_ON_RESUME]
    for key, was, now in differ:
        if key == "betas" and was is not None:
            was = tuple(was)
        if was != now:
            flag = "--" + key.replace("_", "-")
            raise MemtoolError(
                f"checkpoint {folder} was written with {flag} {was!r}; resume with the same "
                f"setting (this run has {now!r}) or start a new run"
            )
    if config["steps"] < step:
        raise MemtoolError(
            f"--steps {config['steps']} is before checkpoint {folder}'s step {step}: resume "
            f"with --steps above {step} (or equal, to only export)"
        )


def _rank_file(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}.safetensors"


def save_checkpoint(
    root: Path, state: TrainerState, shard: dict[str, torch.Tensor], group: Dist
) -> Path:
    """Write this rank's shard and (rank 0) the trainer state; collective. Returns the folder."""
    dest = root / f"step-{state.step:06d}"
    tmp_name = [None]
    if group.is_main:
        root.mkdir(parents=True, exist_ok=True)
        tmp_name[0] = tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=root)
    dist.broadcast_object_list(tmp_name, src=0)
    tmp = Path(tmp_name[0])
    try:
        _write_checkpoint(tmp, dest, state, shard, group)
    except BaseException:
        # An interrupt or a lost rank: no half-written folder stays (a rank killed outright
        # leaves its `.tmp-*`, which the next run into this output removes).
        if group.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    group.barrier()
    return dest


def _write_checkpoint(
    tmp: Path, dest: Path, state: TrainerState, shard: dict[str, torch.Tensor], group: Dist
) -> None:
    tensors, seen = {}, set()
    for key, value in shard.items():
        value = value.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share memory (bitsandbytes' two moments share one
        # quantization map): store a copy of a repeated one
        pointer = value.untyped_storage().data_ptr()
        tensors[key] = value.clone() if pointer in seen else value
        seen.add(pointer)
    tensors["rng.cpu"] = torch.get_rng_state()
    if group.device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(group.device)
    path = tmp / _rank_file(group.rank, group.world_size)
    save_file(tensors, str(path))
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
    crcs = group.gather_objects(file_crc32(path))
    if group.is_main:
        payload = {"format": FORMAT, **state.to_dict(), "crc32": crcs}
        (tmp / STATE_FILE).write_text(json.dumps(payload, indent=1) + "\n")
        os.chmod(tmp, 0o755)
        replace_dir(tmp, dest)


def latest_checkpoint(path: Path) -> Path:
    """`path` itself when it is a checkpoint, else the newest one under `path/checkpoints`."""
    if (path / STATE_FILE).is_file():
        return path
    found = sorted((path / "checkpoints").glob("step-*[0-9]"))
    found = [p for p in found if (p / STATE_FILE).is_file()]
    if not found:
        raise MemtoolError(
            f"no checkpoint in {path}: give a checkpoint folder (…/checkpoints/step-NNNNNN) or "
            "the --output folder of an earlier run"
        )
    return found[-1]


def read_state(folder: Path) -> dict:
    try:
        payload = json.loads((folder / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        message = f"checkpoint {folder} is damaged: {STATE_FILE} unreadable ({exc})"
        raise MemtoolError(message) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise MemtoolError(f"{folder} is not a memtool training checkpoint")
    kinds = {"step": int, "tokens": int, "losses": list, "config": dict, "world_size": int,
             "crc32": list}  # fmt: skip
    for key, kind in kinds.items():
        if not isinstance(payload.get(key), kind):
            raise MemtoolError(f"checkpoint {folder} is damaged: {STATE_FILE} has no valid {key!r}")
    if len(payload["crc32"]) != payload["world_size"]:
        raise MemtoolError(
            f"checkpoint {folder} is damaged: {STATE_FILE} has {len(payload['crc32'])} "
            f"checksums for {payload['world_size']} rank(s)"
        )
    if not isinstance(payload["config"].get("optim"), dict):
        raise MemtoolError(f"checkpoint {folder} is damaged: {STATE_FILE} has no valid 'optim'")
    return payload


def load_shard(
    folder: Path,
    payload: dict,
    group: Dist,
    config: dict,
    reshard: Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """This rank's shard from checkpoint `folder`, after checking it fits this run; written by
    another number of ranks, every rank file is read and `reshard` cuts this rank's part."""
    if payload["world_size"] == group.world_size:
        return _read_rank(folder, payload, group.rank, group)
    if config["optimizer_bits"] == 8:
        raise MemtoolError(
            f"checkpoint {folder} was written by {payload['world_size']} rank(s) with 8-bit "
            f"optimizer states, which cannot be re-cut: resume on {payload['world_size']} "
            f"(this run has {group.world_size})"
        )
    shards = [_read_rank(folder, payload, rank, group) for rank in range(payload["world_size"])]
    return reshard(shards)


def _read_rank(folder: Path, payload: dict, rank: int, group: Dist) -> dict[str, torch.Tensor]:
    """Rank `rank`'s file, checked; this process's RNG state is restored from its own rank's."""
    path = folder / _rank_file(rank, payload["world_size"])
    if not path.is_file():
        raise MemtoolError(f"checkpoint {folder} is damaged: {path.name} is missing")
    if file_crc32(path) != payload["crc32"][rank]:
        raise MemtoolError(f"checkpoint {folder} is damaged: {path.name} fails its checksum")
    try:
        tensors = load_file(str(path))
    except SafetensorError as exc:
        raise MemtoolError(f"checkpoint {folder} is damaged: {path.name}: {exc}") from None
    cpu_rng, cuda_rng = tensors.pop("rng.cpu"), tensors.pop("rng.cuda", None)
    if rank == group.rank:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None and group.device.type == "cuda":
            torch.cuda.set_rng_state(cuda_rng, group.device)
    return tensors
