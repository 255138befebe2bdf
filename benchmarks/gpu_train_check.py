"""Issue 6's GPU check, one script for whenever a GPU machine is lent (a few minutes on one GPU).

1. The training kernels against their references on CUDA, and their timings
   (`benchmarks/gpu_train_kernels.py`, run as a subprocess so its exit code counts).
2. The memory/speed table: peak allocated device memory and step time of one training step
   (fwd+bwd+AdamW, bf16 autocast-free bf16 weights, batch 1) of a Llama-shaped model, for
   plain autograd, transformers' full activation checkpointing, torch's `save_on_cpu`, and
   memtool's modes through `memtool.train.train` (full recompute, swapping, MEMO token-wise,
   optimizer offload, ZeRO-3 with FSDP2's CPU offload). DeepSpeed runs only when installed.
   The target: memtool swapping at <= 1.3x plain step time with <= 25% of its activation memory.

    python benchmarks/gpu_train_check.py [--layers 8 --hidden 2048 --seq-len 2048] [--out FILE]

`--device cpu --tiny` runs the table's code path on CPU with a tiny model (no peak memory there:
the activation accounting from the hooks is printed instead): a smoke test of this script.
"""

import argparse
import copy
import gc
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from memtool.train.activations import ActivationConfig
from memtool.train.config import OptimConfig, TrainConfig
from memtool.train.loop import causal_lm_loss, train

HERE = Path(__file__).resolve().parent
MEMTOOL_MODES = {  # in the order they run: the ones the target is about first
    "memtool plain": ({}, None),
    "memtool MEMO planned": ({}, {"recompute": "tokens", "swap": True}),
    "memtool MEMO a=0": ({}, {"recompute": "tokens", "swap": True, "swap_fraction": 0.0}),
    # Beside the plan's alpha: where between 0 and 0.5 the step time turns up.
    "memtool MEMO a=0.25": ({}, {"recompute": "tokens", "swap": True, "swap_fraction": 0.25}),
    "memtool recompute full": ({}, {"recompute": "full"}),
    "memtool tokens no swap": ({}, {"recompute": "tokens"}),
    "memtool swap all": ({}, {"swap": True}),
    "memtool MEMO a=0.5": ({}, {"recompute": "tokens", "swap": True, "swap_fraction": 0.5}),
    "memtool offload optimizer": ({"offload_optimizer": True}, None),
    "memtool zero 3 + CPU offload": ({"zero": 3, "offload_optimizer": True}, None),
}


def _config(args) -> LlamaConfig:
    if args.tiny:
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                           max_position_embeddings=args.seq_len)  # fmt: skip
    return LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.hidden * 4, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 128, num_key_value_heads=args.hidden // 512 or 1,
        vocab_size=args.vocab, max_position_embeddings=args.seq_len,
    )  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _reset(device: torch.device) -> None:
    gc.collect()  # the last row's model (hooks make cycles) must not count in this row's peak
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def build_model(config: LlamaConfig) -> torch.nn.Module:
    """The rows' model, built once on the host: each row copies it (0.44 s for 0.5B parameters
    on a 2-core CPU) where building one (random init on the CPU) took 4.6 s there."""
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def peer_step_times(name: str, base: torch.nn.Module, args, device: torch.device) -> dict:
    """A plain training loop (no memtool) under one of torch's/transformers' memory modes."""
    config = base.config
    # Cast on the device: casting 1.24B parameters on the host takes seconds.
    model = copy.deepcopy(base).to(device).to(torch.bfloat16)
    if name == "transformers checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    ids = torch.randint(0, config.vocab_size, (1, args.seq_len), device=device)
    times = []
    _reset(device)
    for _ in range(args.steps):
        _sync(device)
        began = time.perf_counter()
        if name == "torch save_on_cpu":
            with torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda"):
                loss = causal_lm_loss(model, ids)
        else:
            loss = causal_lm_loss(model, ids)
        loss.backward()
        adamw.step()
        adamw.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - began)
    return {"mode": name, "step_s": statistics.median(times[1:]), "peak_bytes": _peak(device)}


def memtool_step_times(name, changes, activations, base, tokens, args, folder) -> dict:
    stamps: list[float] = []
    device = torch.device(args.device)

    def stamp() -> None:
        _sync(device)
        stamps.append(time.perf_counter())

    _reset(device)
    run = TrainConfig(
        data=str(tokens), steps=args.steps, batch_size=1, seq_len=args.seq_len,
        compute_dtype="bfloat16", optim=OptimConfig(lr=1e-5), **changes,
    )  # fmt: skip
    stamps.append(time.perf_counter())
    result = train(
        run, folder / name.replace(" ", "_"), model=copy.deepcopy(base), device=args.device,
        activations=ActivationConfig(**activations) if activations else None,
        show_progress=False, on_step=lambda step, loss: stamp(), write_outputs=False,
    )  # fmt: skip
    steps = [b - a for a, b in itertools.pairwise(stamps)][1:]
    rank = result.ranks[0]
    return {
        "mode": name,
        "step_s": statistics.median(steps),
        "first_step_s": stamps[1] - stamps[0],  # setup (device copy, plan) + the first step
        "peak_bytes": _peak(device),
        "activation_bytes_peak": rank["activation_bytes_peak"],
        "swap_fractions": [round(a, 3) for a in rank["activation_swap_fractions"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument(
        "--modes",
        help="comma-separated rows to run (default: all); 'memtool plain' always runs, as the "
        "ratios' base",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gpu_train_check.json")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("this check needs a CUDA device (or --device cpu --tiny for a smoke test)")
        return
    kernels_ok = True
    if not args.skip_kernels and args.device == "cuda":
        began = time.perf_counter()
        kernels_ok = (
            subprocess.run([sys.executable, str(HERE / "gpu_train_kernels.py")]).returncode == 0
        )
        print(f"training kernels: {time.perf_counter() - began:.0f} s", flush=True)
    config = _config(args)
    device = torch.device(args.device)
    peers = ("plain (torch)", "transformers checkpointing", "torch save_on_cpu")
    wanted = set(peers) | set(MEMTOOL_MODES)
    if args.modes:
        wanted = {name.strip() for name in args.modes.split(",")} | {"memtool plain"}
        unknown = wanted - set(peers) - set(MEMTOOL_MODES)
        if unknown:
            parser.error(f"unknown modes {sorted(unknown)}; choose from {[*peers, *MEMTOOL_MODES]}")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []

    def record(row: dict, began: float) -> None:
        # Written after every row: a call cut off by its time limit keeps what it measured.
        rows.append({**row, "row_s": round(time.perf_counter() - began, 1)})
        print(rows[-1], flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": device_name, "rows": rows}, indent=1) + "\n")

    began = time.perf_counter()
    base = build_model(config)
    print(f"model built on the host: {time.perf_counter() - began:.1f} s", flush=True)
    # memtool's rows first: the target compares its modes with each other.
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ids = torch.randint(0, config.vocab_size, (args.seq_len * 8,))
        save_file({"input_ids": ids}, str(folder / "tokens.safetensors"))
        for name, (changes, activations) in MEMTOOL_MODES.items():
            if name in wanted:
                began = time.perf_counter()
                row = memtool_step_times(
                    name, changes, activations, base, folder / "tokens.safetensors", args, folder
                )
                record(row, began)
    for peer in (name for name in peers if name in wanted):
        began = time.perf_counter()
        record(peer_step_times(peer, base, args, device), began)
    plain = next(r for r in rows if r["mode"] == "memtool plain")
    print("\n| mode | step time | vs plain | peak device memory | activations resident |")
    print("|---|---|---|---|---|")
    for row in rows:
        peak = f"{row['peak_bytes'] / 2**30:.2f} GiB" if row["peak_bytes"] else "-"
        act = row.get("activation_bytes_peak")
        act_text = (
            f"{act / 2**20:.0f} MiB ({act / plain['activation_bytes_peak']:.2f})" if act else "-"
        )
        print(f"| {row['mode']} | {row['step_s']:.3f} s | {row['step_s'] / plain['step_s']:.2f}x "
              f"| {peak} | {act_text} |")  # fmt: skip
    sys.exit(0 if kernels_ok else 1)


if __name__ == "__main__":
    main()
