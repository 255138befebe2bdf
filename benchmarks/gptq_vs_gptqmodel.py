"""GPTQ: memtool vs GPTQModel on the default model, same calibration windows, side by side.

Checks issue 4's GPTQ targets on smollm2-135m: perplexity (wiki evaluation split and code) of
memtool GPTQ vs GPTQModel 7.7 vs round-to-nearest at the same bits, group and symmetry; wall time
and peak RSS of both quantizers (each in its own process, one after the other); and
interoperability both ways (memtool loads GPTQModel's checkpoint; GPTQModel loads memtool's).

GPTQModel pins torch >= 2.14.1, so it lives in its own virtualenv, installed without its
dependencies beside torch 2.13 (see BENCHMARKS.md for the exact commands):

    python benchmarks/gptq_vs_gptqmodel.py --gptqmodel-python /tmp/gq/bin/python --bits 4 [--asym]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from memtool import MeasureConfig, load_model, measure
from memtool.compress import RTNConfig, compress
from memtool.data import calibration_windows

CHILDREN = Path(__file__).parent / "_children"


def run_child(python: str, script: str, *args: str, may_fail: bool = False) -> dict:
    """Run a child script; its last stdout line is a JSON object (with its own peak RSS).
    With `may_fail`, a failure is recorded (its last error line) instead of ending the run."""
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [python, str(CHILDREN / script), *args], capture_output=True, text=True, env=env
    )
    if done.returncode != 0:
        if may_fail:
            return {"loaded": False, "error": done.stderr.strip().splitlines()[-1]}
        sys.exit(f"{script} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def perplexities(model, windows: int) -> dict:
    out = {}
    for data in ("wiki", "code"):
        config = MeasureConfig(data=data, max_windows=windows, show_progress=False)
        out[data] = round(measure(model, config).perplexity, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gptqmodel-python", required=True)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--damp", type=float, default=0.01)
    parser.add_argument("--asym", action="store_true", help="asymmetric groups for both tools")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gptq-bench-"))
    base = load_model("smollm2-135m")
    windows = calibration_windows("wiki", base.tokenizer, args.samples, args.seq_len, seed=0)
    torch.save(windows.input_ids, work / "calibration.pt")
    settings = [str(args.bits), str(args.group_size), str(args.damp)]
    symmetry = "asym" if args.asym else "sym"

    report = {
        "settings": vars(args),
        "calibration": windows.to_dict(),
        "machine_threads": torch.get_num_threads(),
    }
    report["memtool"] = run_child(
        sys.executable,
        "memtool_gptq.py",
        str(work / "memtool"),
        str(work / "calibration.pt"),
        *settings,
        symmetry,
    )
    report["gptqmodel"] = run_child(
        args.gptqmodel_python,
        "gptqmodel_gptq.py",
        str(base.path),
        str(work / "gptqmodel"),
        str(work / "calibration.pt"),
        *settings,
        symmetry,
    )
    report["ppl_fp32"] = perplexities(base, args.eval_windows)
    del base
    for name in ("memtool", "gptqmodel"):  # memtool reads both checkpoints
        report[name]["ppl"] = perplexities(load_model(work / name), args.eval_windows)
    for sym in (True, False):
        _, _, rtn = compress(
            "smollm2-135m", RTNConfig(args.bits, args.group_size, sym), show_progress=False
        )
        report["rtn_sym" if sym else "rtn_asym"] = perplexities(rtn, args.eval_windows)
    # The other direction: GPTQModel loads memtool's checkpoint; compare logits with memtool's.
    ours = load_model(work / "memtool")
    prompt = ours.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.save(ours.model(prompt).logits.float(), work / "memtool_logits.pt")
    report["gptqmodel_reads_memtool"] = run_child(
        args.gptqmodel_python,
        "gptqmodel_load.py",
        str(work / "memtool"),
        str(work / "memtool_logits.pt"),
        may_fail=True,  # GPTQModel 7.7 refuses asymmetric v1 checkpoints of other producers
    )
    report["work_dir"] = str(work)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
