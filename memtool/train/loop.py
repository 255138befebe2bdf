"""`memtool.train.train`: full fine-tuning (or training from a config) on torch.distributed.

One function runs on every rank; `torchrun --nproc_per_node N -m memtool train ...` and a plain
`memtool train ...` run the same code (`memtool.train.distributed`). Each optimizer step takes a
global batch (`memtool.train.data.BatchSchedule`), runs this rank's micro-batches forward and
backward, then the ZeRO engine (`zero.ZeroOptimizer` for stages 0-2, `fsdp.FSDPOptimizer` for 3)
reduces, clips and steps. SIGINT/SIGTERM set a flag that every rank checks after each step (one
all-reduce), so all ranks stop at the same step and write a resumable checkpoint together.
"""

import contextlib
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from memtool.atomic import clean_stale_temporaries
from memtool.errors import MemtoolError
from memtool.metrics.memory import peak_rss_bytes
from memtool.progress import counted_steps
from memtool.train.activations import ActivationConfig, ActivationManager
from memtool.train.checkpoint import (
    STATE_FILE,
    TrainerState,
    check_resumable,
    latest_checkpoint,
    load_shard,
    model_signature,
    read_state,
    save_checkpoint,
)
from memtool.train.config import TrainConfig
from memtool.train.data import BatchSchedule, is_token_file, load_token_file
from memtool.train.distributed import Dist, process_group
from memtool.train.export import export_model
from memtool.train.fsdp import FSDPOptimizer
from memtool.train.zero import ZeroOptimizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class TrainResult:
    """What a run did. `ranks` holds each rank's memory accounting (bytes by role)."""

    steps: int
    tokens: int
    final_loss: float
    losses: list[float]
    tokens_per_s: float
    seconds: float
    output: Path
    model_dir: Path | None
    checkpoint: Path | None
    interrupted: bool
    world_size: int
    ranks: list[dict] = field(default_factory=list)
    peak_rss_bytes: int = 0

    def to_dict(self) -> dict:
        out = dict(self.__dict__)
        for key in ("output", "model_dir", "checkpoint"):
            out[key] = str(out[key]) if out[key] is not None else None
        return out


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch (logits in fp32)."""
    logits = model(input_ids=input_ids, use_cache=False).logits
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1)
    )


class _StopFlag:
    """SIGINT/SIGTERM request a clean stop; a second signal interrupts at once."""

    def __init__(self) -> None:
        self.requested = False

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    @contextlib.contextmanager
    def installed(self) -> Iterator["_StopFlag"]:
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self._handler) for sig in signals}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _build_model(source: str | nn.Module | None, from_config: Path | None, seed: int) -> nn.Module:
    if isinstance(source, nn.Module):
        # A module built in Python (a benchmark's, built once for many runs): trained in place.
        if not hasattr(source, "get_input_embeddings") or not hasattr(source, "config"):
            raise MemtoolError(
                f"model: a {type(source).__name__} is not a transformers causal LM; pass a "
                "PreTrainedModel (AutoModelForCausalLM) or a model source"
            )
        return source.float()
    if from_config is not None:
        from transformers import AutoConfig, AutoModelForCausalLM

        # A config file of any name (a recipe keeps several side by side), or a folder's.
        if not (from_config.is_file() or (from_config / "config.json").is_file()):
            raise MemtoolError(f"--from-config {from_config}: no config file or config.json")
        try:
            config = AutoConfig.from_pretrained(from_config)
        except (OSError, ValueError) as exc:
            raise MemtoolError(f"--from-config {from_config}: not a model config ({exc})") from None
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    from memtool.models import load_model

    return load_model(source, dtype="float32").model


def _tokenizer(source: str | nn.Module | None, from_config: Path | None, needed: bool):
    from memtool.models.loader import load_tokenizer

    if isinstance(source, nn.Module):
        if needed:
            raise MemtoolError(
                "text data needs a tokenizer, and a model passed as a module has none: pass a "
                "token file (.safetensors with input_ids) as data"
            )
        return None
    if from_config is not None and source is None:
        folder = from_config.parent if from_config.is_file() else from_config
        if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
            return load_tokenizer(folder)
        return load_tokenizer(None) if needed else None
    return load_tokenizer(source)


def _source_name(source: str | nn.Module | None, from_config: Path | None) -> str:
    if from_config is not None:
        return str(from_config)
    return f"<{type(source).__name__} module>" if isinstance(source, nn.Module) else str(source)


def _windows(config: TrainConfig, tokenizer) -> torch.Tensor:
    if is_token_file(config.data):
        return load_token_file(Path(config.data).expanduser(), config.seq_len)
    from memtool.data import training_windows

    return training_windows(config.data, tokenizer, config.seq_len).input_ids


def _check_vocab(model: nn.Module, windows: torch.Tensor) -> None:
    vocab = model.get_input_embeddings().num_embeddings
    if int(windows.min()) < 0:
        raise MemtoolError(
            f"the data holds token id {int(windows.min())}: token ids are 0 or more; use the "
            "model's own tokenizer"
        )
    top = int(windows.max())
    if top >= vocab:
        raise MemtoolError(
            f"the data holds token id {top}, outside the model's vocabulary of {vocab}; use the "
            "model's own tokenizer"
        )


def _engine(model: nn.Module, config: TrainConfig, group: Dist):
    dtype = DTYPES[config.compute_dtype]
    if config.zero == 3:
        return FSDPOptimizer(model, config.optim, group, dtype, config.offload_optimizer)
    model.to(group.device)
    return ZeroOptimizer(
        model, config.zero, config.optim, group, dtype, config.offload_optimizer,
        config.optimizer_bits,
    )  # fmt: skip


def train(
    config: TrainConfig,
    output: Path,
    *,
    model: str | nn.Module | None = None,
    from_config: Path | None = None,
    resume: Path | None = None,
    activations: ActivationConfig | None = None,
    device: str | None = None,
    export_dtype: str = "bfloat16",
    show_progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    write_outputs: bool = True,
) -> TrainResult:
    """Train `model` or a fresh model from `from_config`.

    `model` is a source `load_model` accepts, or a transformers causal LM module, trained in
    place: made float32, moved to the device, its parameters updated (data must then be a token
    file: a module brings no tokenizer). With several ranks each passes its own, equal module.

    Args:
        config: The run (`TrainConfig`); validated against the world size here.
        output: Folder for `checkpoints/step-NNNNNN/` and the final export `model/`.
        resume: A checkpoint folder or an earlier run's output folder (its newest checkpoint).
        activations: A `memtool.train.activations.ActivationConfig`, or None for plain autograd.
        device: "cpu", "cuda" or None (CUDA when available).
        export_dtype: dtype of the exported weights ("float32" or "bfloat16").
        on_step: Called on every rank after every step with (step, loss): callers' logging,
            tests that stop a run part-way.
        write_outputs: False writes neither checkpoints nor the export (benchmarks timing steps
            of models whose optimizer state would take minutes and many GB to write).

    Returns:
        A `TrainResult` (the same on every rank).

    Raises:
        MemtoolError: bad settings or data, a damaged or mismatched checkpoint, a lost rank.
    """
    if model is not None and from_config is not None:
        raise MemtoolError("give a MODEL to fine-tune or --from-config, not both")
    if export_dtype not in DTYPES:
        raise MemtoolError(f"unknown export dtype {export_dtype!r}: use float32 or bfloat16")
    with process_group(device) as group:
        config.validate(group.world_size)
        return _run(
            config, output, group, model, from_config, resume, activations, export_dtype,
            show_progress and group.is_main, on_step, write_outputs,
        )  # fmt: skip


def _run(config, output, group, source, from_config, resume, activations, export_dtype, show,
         on_step, write_outputs) -> TrainResult:  # fmt: skip
    resume_dir = latest_checkpoint(resume) if resume is not None else None
    payload = read_state(resume_dir) if resume_dir is not None else None
    if write_outputs:
        _check_output(output, payload["step"] if payload is not None else 0, group)
    text_data = not is_token_file(config.data)
    tokenizer = _tokenizer(source, from_config, needed=text_data)
    windows = _windows(config, tokenizer)
    schedule = BatchSchedule(windows, config.batch_size, config.seed)
    net = _build_model(source, from_config, config.seed)
    signature = model_signature(net)
    if payload is not None:
        check_resumable(resume_dir, payload, config.to_dict(), signature)
    _check_vocab(net, windows)
    net.train()
    # Plain autograd too runs under the manager: its hooks count the saved activations, so
    # every run reports `activation_bytes_peak`.
    manager = ActivationManager(net, activations or ActivationConfig())
    engine = _engine(net, config, group)
    start, losses, tokens = 0, [], 0
    if payload is not None:
        shard = load_shard(resume_dir, payload, group, config.to_dict(), engine.reshard)
        start, losses, tokens = payload["step"], list(payload["losses"]), payload["tokens"]
        engine.load_shard_state(shard, start)
    torch.manual_seed(config.seed + 1000 * group.rank + start)
    step_tokens = config.batch_size * config.seq_len
    ckpt_root = output / "checkpoints"
    checkpoint: Path | None = None
    interrupted = False
    source_name = _source_name(source, from_config)
    stop = _StopFlag()

    def state(step: int) -> TrainerState:
        return TrainerState(
            step, tokens, losses, config.to_dict(), group.world_size, source_name, signature
        )

    began = time.perf_counter()
    done_here = 0
    with stop.installed(), counted_steps("train", config.steps, show) as (bar, task):
        bar.update(task, completed=start)
        for step in range(start, config.steps):
            try:
                loss = _one_step(net, engine, schedule, step, group, config, manager)
                if not math.isfinite(loss):
                    last = (
                        f"checkpoint {checkpoint or resume_dir}"
                        if (checkpoint or resume_dir)
                        else "no checkpoint was written"
                    )
                    raise MemtoolError(
                        f"the loss is {loss} at step {step + 1}: training diverged; lower --lr "
                        f"or clip harder (--max-grad-norm) ({last}; nothing after it was kept)"
                    )
                losses.append(loss)
                tokens += step_tokens
                done_here += 1
                if on_step is not None:
                    on_step(step + 1, loss)
                rate = done_here * step_tokens / (time.perf_counter() - began)
                rss = peak_rss_bytes() / 2**30
                bar.update(
                    task, advance=1, status=f"loss {loss:.4f}  {rate:,.0f} tok/s  {rss:.2f} GiB"
                )
                last_step = step + 1 == config.steps
                periodic = config.save_every and (step + 1) % config.save_every == 0
                stopping = group.all_reduce_max(float(stop.requested)) > 0
                if write_outputs and (periodic or stopping or last_step):
                    shard = engine.shard_state()
                    checkpoint = save_checkpoint(ckpt_root, state(step + 1), shard, group)
            except RuntimeError as exc:
                if group.world_size > 1 and _lost_peer(exc):
                    last = checkpoint or resume_dir
                    kept = (
                        f"the last checkpoint ({last}) stays valid"
                        if last
                        else "no checkpoint was written yet"
                    )
                    raise MemtoolError(
                        f"rank {group.rank} lost contact with the other ranks at step "
                        f"{step + 1} (did one stop?); {kept}"
                    ) from None
                raise
            if stopping and not last_step:
                interrupted = True
                break
    seconds = time.perf_counter() - began
    model_dir = None
    if write_outputs and not interrupted:
        model_dir = output / "model"
        steps_meta = {"memtool_train_steps": str(len(losses))}
        with _interrupts_raise():  # torchrun SIGTERMs survivors when a rank dies: say so
            export_model(net, engine, tokenizer, model_dir, DTYPES[export_dtype], group, steps_meta)
    memory = engine.memory()
    stats = manager.stats()
    memory["activation_bytes_peak"] = stats.peak_resident_bytes
    memory["host_activation_bytes_peak"] = stats.host_bytes_peak
    memory["activation_swap_fractions"] = list(stats.layer_swap_fractions)
    ranks = group.gather_objects({"rank": group.rank, **memory})
    engine.close()
    return TrainResult(
        steps=len(losses),
        tokens=tokens,
        final_loss=losses[-1] if losses else float("nan"),
        losses=losses,
        tokens_per_s=done_here * step_tokens / seconds if seconds > 0 else 0.0,
        seconds=seconds,
        output=output,
        model_dir=model_dir,
        checkpoint=checkpoint,
        interrupted=interrupted,
        world_size=group.world_size,
        ranks=ranks,
        peak_rss_bytes=peak_rss_bytes(),
    )


@contextlib.contextmanager
def _interrupts_raise() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt in the block (the export: stopping it means
    abandoning it, and the atomic write leaves the earlier export as it was)."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _check_output(output: Path, start: int, group: Dist) -> None:
    """Refuse an output that cannot take this run's checkpoints and export, before any work;
    remove the `.tmp-*` folders of runs killed while writing into it."""
    for path in (output, output / "checkpoints", output / "model"):
        if path.exists() and not path.is_dir():
            raise MemtoolError(f"--output: {path} is a file, not a folder; give another --output")
    root = output / "checkpoints"
    later = [
        p
        for p in sorted(root.glob("step-*[0-9]"))
        if p.name[5:].isdigit() and (p / STATE_FILE).is_file() and int(p.name[5:]) > start
    ]
    if later:
        what = (
            f"holds checkpoints past step {start} of the run being resumed"
            if start
            else "already holds checkpoints of another run"
        )
        hint = "resume from the newest" if start else f"continue it with --resume {output}"
        raise MemtoolError(
            f"--output {output} {what} (newest: {later[-1].name}); {hint}, or give another --output"
        )
    if group.is_main:
        clean_stale_temporaries(root, "step")
        clean_stale_temporaries(output, "model")


def _lost_peer(exc: RuntimeError) -> bool:
    """A collective failed because another rank went away (gloo/NCCL transport errors)."""
    text = str(exc).lower()
    return any(
        word in text for word in ("connection", "peer", "socket", "nccl", "gloo", "timed out")
    )


def _one_step(net, engine, schedule, step, group, config, manager) -> float:
    # The loss stays on the device until the step is queued: reading it after each backward
    # would make the host wait for the device there, and the device then wait for the host.
    total = torch.zeros((), dtype=torch.float64, device=group.device)
    micro_batches = schedule.micro_batches(step, group.rank, group.world_size, config.grad_accum)
    for input_ids in micro_batches:
        input_ids = input_ids.to(group.device)
        with manager.forward_context():
            loss = causal_lm_loss(net, input_ids)
        (loss / config.grad_accum).backward()
        engine.after_backward()
        total += loss.detach().double() / config.grad_accum
    if group.world_size > 1:
        dist.all_reduce(total)
        total /= group.world_size
    engine.step(step + 1)
    return float(total)
