"""The GPU session's scripts still run: their CPU smoke modes, in fresh processes.

A GPU machine is lent rarely and for minutes; a script broken by a library change would waste
that time. These runs check the code paths (the library calls, the table, the JSON written after
every row), not numbers: on CPU there is no peak device memory and the kernels run in Triton's
interpreter at small sizes.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: object, interpret: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *map(str, args)],
        capture_output=True, text=True, env=env, timeout=600, cwd=ROOT,
    )  # fmt: skip


def test_training_table_runs_every_mode_on_cpu(tmp_path):
    out = tmp_path / "table.json"
    done = _run("gpu_train_check.py", "--device", "cpu", "--tiny", "--seq-len", 64, "--out", out)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {row["mode"]: row for row in json.loads(out.read_text())["rows"]}
    assert len(rows) == 13  # memtool's 10 modes and the 3 peers
    assert rows["memtool MEMO planned"]["swap_fractions"]  # planned per layer
    plain = rows["memtool plain"]["activation_bytes_peak"]
    assert 0 < rows["memtool recompute full"]["activation_bytes_peak"] < plain
    assert "| memtool MEMO planned |" in done.stdout


def test_training_profile_runs_on_cpu(tmp_path):
    out = tmp_path / "profile.json"
    done = _run("gpu_train_profile.py", "--device", "cpu", "--tiny", "--seq-len", 64,
                "--modes", "memtool plain,memtool MEMO planned", "--out", out)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["mode"] for row in rows] == ["memtool plain", "memtool MEMO planned"]
    assert all(row["wall_s"] > 0 for row in rows)


def test_inference_kernel_checks_pass_in_the_interpreter(tmp_path):
    done = _run("gpu_linear_kernels.py", "--device", "cpu", "--out", tmp_path / "k.json",
                interpret=True)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "0 failed checks" in done.stdout
    assert "ok   sign feedback" in done.stdout


def test_training_kernel_checks_pass_in_the_interpreter():
    done = _run("gpu_train_kernels.py", "--device", "cpu", "--adamw-numel", 4096, "--rows", 64,
                "--cols", 300, "--repeats", 2, interpret=True)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "FAIL" not in done.stdout and "ok   AdamW bf16 copy" in done.stdout
