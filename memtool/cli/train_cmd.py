"""`memtool train`: full fine-tuning, or training from a config, with ZeRO sharding and offload.

The same command line runs one process or many: `torchrun --nproc_per_node N -m memtool train
...` (or `accelerate launch -m memtool train ...`). Only rank 0 prints.
"""

import os
from pathlib import Path

import typer

from memtool.cli.common import DebugOption, JsonOption, fail, run_command
from memtool.errors import MemtoolError
from memtool.progress import console
from memtool.sizes import format_size, parse_size
from memtool.train.config import OptimConfig, TrainConfig


def _activation_config(
    swap: bool, fraction: float | None, budget: str | None, recompute: str, stash: str | None
):
    if recompute not in ("none", "full", "tokens"):
        raise MemtoolError(f"unknown --recompute {recompute!r}: use none, full or tokens")
    if fraction is not None and budget is not None:
        raise MemtoolError("give --swap-fraction or --activation-budget, not both")
    if fraction is not None and not swap:
        raise MemtoolError("--swap-fraction applies with --swap-activations")
    if stash is not None and not swap:
        raise MemtoolError("--stash-dtype applies with --swap-activations")
    if not swap and recompute == "none" and budget is None:
        return None
    from memtool.train.activations import ActivationConfig

    if fraction is not None and recompute == "none":
        recompute = "tokens"  # a fraction of tokens swapped means the rest is recomputed (MEMO)
    config = ActivationConfig(
        recompute=recompute,
        swap=swap,
        swap_fraction=fraction,
        activation_budget_bytes=parse_size(budget) if budget is not None else None,
        compress=stash,
    )
    config.validate()
    return config


def train_command(
    model: str = typer.Argument(
        None, help="Model to fine-tune (name, folder, .gguf, hub id). Default: smollm2-135m."
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for checkpoints and model/."),
    data: str = typer.Option(
        "wiki", "--data", help="Text spec (wiki, code, mixed, a file) or a tokens .safetensors."
    ),
    steps: int = typer.Option(100, "--steps", help="Optimizer steps (a resumed run counts on)."),
    lr: float = typer.Option(1e-4, "--lr", help="Peak learning rate (AdamW)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Sequences per step, all ranks."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per sequence."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per step on each rank."),
    zero: int = typer.Option(0, "--zero", help="ZeRO stage: 0, 1, 2 or 3 (FSDP2)."),
    offload_optimizer: bool = typer.Option(
        False, "--offload-optimizer", help="fp32 masters and Adam moments in host memory."
    ),
    optimizer_bits: int = typer.Option(
        32, "--optimizer-bits", help="32, or 8 for bitsandbytes 8-bit Adam states (zero 0-2)."
    ),
    swap_activations: bool = typer.Option(
        False, "--swap-activations", help="Offload saved activations to host memory (MEMO)."
    ),
    swap_fraction: float = typer.Option(
        None, "--swap-fraction", help="Fraction of tokens swapped (the rest recomputed)."
    ),
    activation_budget: str = typer.Option(
        None, "--activation-budget", help="Device activation budget (2GB): picks the fraction."
    ),
    recompute: str = typer.Option("none", "--recompute", help="none, full or tokens."),
    stash_dtype: str = typer.Option(
        None, "--stash-dtype", help="Swapped activations kept on the host as bf16 or int8."
    ),
    compute_dtype: str = typer.Option("float32", "--compute-dtype", help="float32 or bfloat16."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW decoupled weight decay."),
    warmup_steps: int = typer.Option(0, "--warmup-steps", help="Linear learning-rate warmup."),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm", help="Clip; 0 disables."),
    save_every: int = typer.Option(None, "--save-every", help="Checkpoint every N steps."),
    resume: Path = typer.Option(None, "--resume", help="Checkpoint or earlier --output folder."),
    from_config: Path = typer.Option(
        None, "--from-config", help="Train a fresh model from a Hugging Face config.json."
    ),
    seed: int = typer.Option(0, "--seed", help="Seeds the fresh model, data order and RNG."),
    device: str = typer.Option(None, "--device", help="cpu or cuda (default: cuda if present)."),
    export_dtype: str = typer.Option("bfloat16", "--export-dtype", help="float32 or bfloat16."),
    json_out: bool = JsonOption,
    debug: bool = DebugOption,
) -> None:
    """Train a model; the result is exported as a Hugging Face folder OUTPUT/model."""
    from memtool.train.loop import train

    is_main = int(os.environ.get("RANK", "0")) == 0
    result_holder = {}

    def action() -> tuple[dict, list[str]]:
        config = TrainConfig(
            data=data,
            steps=steps,
            batch_size=batch_size,
            seq_len=seq_len,
            grad_accum=grad_accum,
            zero=zero,
            offload_optimizer=offload_optimizer,
            compute_dtype=compute_dtype,
            optimizer_bits=optimizer_bits,
            seed=seed,
            save_every=save_every,
            optim=OptimConfig(
                lr=lr,
                weight_decay=weight_decay,
                warmup_steps=warmup_steps,
                max_grad_norm=max_grad_norm or None,
            ),
        )
        config.validate()  # world-size checks follow once the process group exists
        activations = _activation_config(
            swap_activations, swap_fraction, activation_budget, recompute, stash_dtype
        )
        result = train(
            config,
            output,
            model=model,
            from_config=from_config,
            resume=resume,
            activations=activations,
            device=device,
            export_dtype=export_dtype,
            show_progress=not json_out,
        )
        result_holder["result"] = result
        return result.to_dict(), []

    def render(payload: dict) -> None:
        console.print(
            f"trained {payload['steps']} steps, {payload['tokens']:,} tokens, final loss "
            f"{payload['final_loss']:.4f}, {payload['tokens_per_s']:,.0f} tokens/s on "
            f"{payload['world_size']} rank(s)"
        )
        for rank in payload["ranks"]:
            parts = ", ".join(
                f"{k.replace('_bytes', '')} {format_size(v)}"
                for k, v in rank.items()
                if "_bytes" in k
            )
            console.print(f"  rank {rank['rank']}: {parts}")
        if payload["model_dir"]:
            console.print(f"model: {payload['model_dir']}")

    if not is_main:
        json_out = False
        render = lambda payload: None  # noqa: E731 - other ranks stay quiet
    run_command(action, json_out=json_out and is_main, debug=debug, render=render)
    result = result_holder.get("result")
    if result is not None and result.interrupted:
        if is_main:
            fail(
                f"interrupted after step {result.steps}; checkpoint {result.checkpoint}; resume "
                f"with --resume {result.output}"
            )
        raise typer.Exit(130)
