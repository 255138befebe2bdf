"""The trainer's fused optimizer step: memtool's Triton AdamW kernel, which ZeRO stages 0-2 use
on the compute device wherever Triton runs (CUDA). Here it runs in Triton's interpreter on CPU,
in a child process (triton reads TRITON_INTERPRET once, at import), and must give the loss curve
of torch's AdamW: the plain single-process loop in float32, the trainer's own torch path with
bfloat16 compute weights (which the kernel writes itself), and an exact resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memtool.train.config import OptimConfig, TrainConfig
from memtool.train.loop import train

pytest.importorskip("triton")

STEPS = 12
CHILD = """
import json, logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
from memtool.train.config import OptimConfig, TrainConfig
from memtool.train.loop import train
args = json.loads(sys.argv[1])
if args.get("guard"):
    # After the first step, any tensor read back to the host inside the optimizer step fails:
    # on a GPU each such read stalls the host until the device has drained.
    import torch
    from memtool.train import zero
    real_step = zero.ZeroOptimizer.step
    def refuse(*_, **__):
        raise AssertionError("the optimizer step read a tensor back to the host")
    def guarded(self, step):
        if step == 1:
            return real_step(self, step)
        names = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")
        saved = {name: getattr(torch.Tensor, name) for name in names}
        for name in names:
            setattr(torch.Tensor, name, refuse)
        try:
            return real_step(self, step)
        finally:
            for name, method in saved.items():
                setattr(torch.Tensor, name, method)
    zero.ZeroOptimizer.step = guarded
config = TrainConfig(**args["config"], optim=OptimConfig(**args["optim"]))
resume = Path(args["resume"]) if args.get("resume") else None
result = train(config, Path(args["out"]), from_config=Path(args["config_json"]), device="cpu",
               export_dtype="float32", show_progress=False, resume=resume)
print(json.dumps({"losses": result.losses, "steps": result.steps}))
"""
OPTIM = {"lr": 3e-3, "weight_decay": 0.01, "max_grad_norm": 0.5}


def _config(tokens: Path, **changes) -> dict:
    return dict(data=str(tokens), steps=STEPS, batch_size=4, seq_len=32, seed=0) | changes


def run_interpreted(
    tiny_run, out: Path, resume: Path | None = None, guard: bool = False, **changes
) -> dict:
    config_json, tokens = tiny_run
    args = {
        "guard": guard,
        "config": _config(tokens, **changes),
        "optim": OPTIM,
        "out": str(out),
        "config_json": str(config_json),
        "resume": str(resume) if resume else None,
    }
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(args)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    # The step ran on the kernel, not on torch's AdamW.
    assert "adamw_step runs on the triton backend (cpu tensors)" in done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_here(tiny_run, out: Path, **changes) -> list[float]:
    """The trainer in this process: no interpreter, so torch's fused AdamW steps."""
    config_json, tokens = tiny_run
    config = TrainConfig(**_config(tokens, **changes), optim=OptimConfig(**OPTIM))
    return train(config, out, from_config=config_json, device="cpu", export_dtype="float32",
                 show_progress=False).losses  # fmt: skip


@pytest.mark.parametrize("zero", [0, 2])
def test_fused_step_float32_equals_torch_adamw(tiny_run, tmp_path, zero):
    fused = run_interpreted(tiny_run, tmp_path / "fused", zero=zero)
    torch_path = run_here(tiny_run, tmp_path / "torch", zero=zero)
    # The kernel's arithmetic is torch's CPU AdamW's, except torch's vectorised sqrt (off by
    # one ulp for some inputs): a few ulps per step, as between torch's own AdamW variants.
    torch.testing.assert_close(fused["losses"], torch_path, rtol=1e-5, atol=0)


def test_fused_step_writes_bfloat16_compute_weights(tiny_run, tmp_path):
    fused = run_interpreted(tiny_run, tmp_path / "fused", zero=1, compute_dtype="bfloat16")
    torch_path = run_here(tiny_run, tmp_path / "torch", zero=1, compute_dtype="bfloat16")
    # Same masters up to ulps; the bfloat16 weights round them the same way (to nearest even).
    torch.testing.assert_close(fused["losses"], torch_path, rtol=2e-3, atol=0)
    assert fused["losses"][-1] < fused["losses"][0] - 0.3


def test_fused_step_resumes_exactly(tiny_run, tmp_path):
    whole = run_interpreted(tiny_run, tmp_path / "whole", save_every=6)
    first = run_interpreted(tiny_run, tmp_path / "part", save_every=6, steps=6)
    assert first["losses"] == whole["losses"][:6]
    rest = run_interpreted(tiny_run, tmp_path / "rest", resume=tmp_path / "part", save_every=6)
    # A resumed run reports the checkpoint's losses too: the whole curve, bit for bit.
    assert rest["losses"] == whole["losses"]


def test_fused_step_reads_nothing_back_to_the_host(tiny_run, tmp_path):
    """Norm, clipping coefficient and step count stay where they are computed (the device)."""
    guarded = run_interpreted(tiny_run, tmp_path / "guarded", guard=True, steps=4,
                              compute_dtype="bfloat16")  # fmt: skip
    assert guarded["steps"] == 4
