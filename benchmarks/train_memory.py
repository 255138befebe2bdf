"""Issue 6's memory accounting and CPU step times, every mode side by side in one run.

Trains a mid-size Llama-shaped model built from a config (random init, pre-tokenized random data,
fp32 unless a mode says otherwise) for a few steps per mode and records, per rank:
parameter, gradient and optimizer-state bytes on the compute device (and in host memory), and
the peak bytes of saved activations resident on the compute device, counted through the
saved-tensor hooks. The accounting is exact on any machine; the step times are this machine's
(on CPU host and device memory are the same, so swapping and offload buy nothing here and cost
copies: the times say how much). bf16 compute is left out: on CPUs without native bf16 matrix
units it runs ~15x slower than fp32 (93 s vs 6.4 s per step here), which says nothing about it.

Usage:
    python benchmarks/train_memory.py [--seq-len 2048] [--steps 3] [--out FILE.json]
    python benchmarks/train_memory.py --report-only   # print the table of the saved results
"""

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

from memtool.train.activations import ActivationConfig
from memtool.train.config import OptimConfig, TrainConfig
from memtool.train.loop import train

RESULTS = Path(__file__).with_name("results") / "train_memory.json"
MODES = {
    "plain": ({}, None),
    "recompute full": ({}, {"recompute": "full"}),
    "swap all": ({}, {"swap": True}),
    "MEMO tokens a=0.5": ({}, {"recompute": "tokens", "swap": True, "swap_fraction": 0.5}),
    "MEMO tokens a=0": ({}, {"recompute": "tokens", "swap": True, "swap_fraction": 0.0}),
    "swap all, int8 stash": ({}, {"swap": True, "compress": "int8"}),
    "zero 2": ({"zero": 2}, None),
    "zero 3 (FSDP2)": ({"zero": 3}, None),
    "offload optimizer": ({"offload_optimizer": True}, None),
    "offload + 8-bit states": ({"offload_optimizer": True, "optimizer_bits": 8}, None),
}


def _model_and_data(folder: Path, seq_len: int) -> tuple[Path, Path]:
    config = LlamaConfig(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=8192,
        max_position_embeddings=max(seq_len, 2048),
        tie_word_embeddings=True,
    )
    config.save_pretrained(folder / "model")
    ids = torch.randint(0, 8192, (seq_len * 16,), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids}, str(folder / "tokens.safetensors"))
    return folder / "model" / "config.json", folder / "tokens.safetensors"


def _run_mode(name, changes, activations, config_json, tokens, args, folder) -> dict:
    stamps: list[float] = []
    config = TrainConfig(
        data=str(tokens), steps=args.steps, batch_size=1, seq_len=args.seq_len,
        optim=OptimConfig(lr=1e-4), **changes,
    )  # fmt: skip
    stamps.append(time.perf_counter())
    result = train(
        config, folder / name.replace(" ", "_"), from_config=config_json,
        activations=ActivationConfig(**activations) if activations else None,
        show_progress=False, on_step=lambda step, loss: stamps.append(time.perf_counter()),
    )  # fmt: skip
    steps = [b - a for a, b in itertools.pairwise(stamps)][1:]  # drop the first
    return {"mode": name, "step_s": statistics.median(steps), "ranks": result.ranks}


def _two_ranks(config_json, tokens, args, folder) -> dict:
    """ZeRO-3 on 2 gloo ranks (one torchrun launch), for the per-rank bytes."""
    worker = Path(__file__).resolve().parents[1] / "tests" / "train" / "dist_worker.py"
    base = TrainConfig(data=str(tokens), steps=2, batch_size=2, seq_len=args.seq_len).to_dict()
    spec = {"config_json": str(config_json), "output": str(folder / "two"), "base": base,
            "jobs": [{"zero": 3}]}  # fmt: skip
    (folder / "jobs.json").write_text(json.dumps(spec))
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(worker), str(folder / "jobs.json")],
        check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    ranks = json.loads((folder / "results.json").read_text())[0]["ranks"]
    return {"mode": "zero 3 (FSDP2), 2 ranks", "step_s": None, "ranks": ranks}


def _held(rank: dict) -> int:
    return rank["param_bytes"] + rank["grad_bytes"] + rank["optimizer_state_bytes"]


def report(results: dict) -> str:
    rows = results["modes"]
    plain = next(r for r in rows if r["mode"] == "plain")
    lines = [
        f"seq_len {results['seq_len']}, batch 1, fp32 unless stated; machine: {results['machine']}",
        "",
        "| mode | params+grads+states on device (rank 0) | vs plain | activations resident "
        "(peak) | vs plain | step time | vs plain |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        rank = row["ranks"][0]
        held = _held(rank)
        act = rank.get("activation_bytes_peak", plain["ranks"][0].get("activation_bytes_peak"))
        plain_act = plain["ranks"][0]["activation_bytes_peak"]
        step = f"{row['step_s']:.2f} s" if row["step_s"] else "-"
        ratio = f"{row['step_s'] / plain['step_s']:.2f}x" if row["step_s"] else "-"
        lines.append(
            f"| {row['mode']} | {held / 2**20:.1f} MiB | {held / _held(plain['ranks'][0]):.2f} | "
            f"{act / 2**20:.1f} MiB | {act / plain_act:.2f} | {step} | {ratio} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if args.report_only:
        print(report(json.loads(args.out.read_text())))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config_json, tokens = _model_and_data(folder, args.seq_len)
        rows = []
        for name, (changes, activations) in MODES.items():
            rows.append(_run_mode(name, changes, activations, config_json, tokens, args, folder))
            print(f"{name}: {rows[-1]['step_s']:.2f} s/step", file=sys.stderr, flush=True)
        rows.append(_two_ranks(config_json, tokens, args, folder))
    results = {
        "seq_len": args.seq_len,
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, no GPU",
        "modes": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(report(results))


if __name__ == "__main__":
    main()
