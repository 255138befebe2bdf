"""Where a memtool training step spends its time on a GPU: host (Python, launches) or device.

For each mode of `gpu_train_check.py` asked for, one step after the plan is made (step 3 of 4) is
recorded with `torch.profiler`: the step's wall time, the device's busy time (the union of its
kernel and copy intervals), the host time in memtool's saved-tensor hooks, and the top operators
by host and by device time. With `--syncs` the same step runs under
`torch.cuda.set_sync_debug_mode("warn")` and every call that synchronizes the host with the device
is printed with the memtool frame that caused it. A step whose device is busy for much less than
its wall time is bound by the host, and making copies or recomputation cheaper on the device will
not speed it up.

    python benchmarks/gpu_train_profile.py --layers 4 --hidden 4096 \
        --modes "memtool plain,memtool MEMO planned" [--traces DIR] [--syncs]
"""

import argparse
import copy
import gzip
import json
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.profiler import ProfilerActivity, profile, schedule

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from gpu_train_check import MEMTOOL_MODES, _config, build_model  # noqa: E402

from memtool.train.activation_swap import SavedTensorStore  # noqa: E402
from memtool.train.activations import ActivationConfig  # noqa: E402
from memtool.train.config import OptimConfig, TrainConfig  # noqa: E402
from memtool.train.loop import train  # noqa: E402

RECORDED_STEP = 3  # steps 1-2: the probe (when planned) and a warm-up under the plan
HOOK_CLOCK: dict[int, float] = {}  # step -> host seconds inside the store's pack/unpack hooks
_STEP = [0]


def _timed(method):
    def wrapper(self, arg):
        began = time.perf_counter()
        try:
            return method(self, arg)
        finally:
            step = _STEP[0]
            HOOK_CLOCK[step] = HOOK_CLOCK.get(step, 0.0) + time.perf_counter() - began

    return wrapper


SavedTensorStore.pack = _timed(SavedTensorStore.pack)
SavedTensorStore.unpack = _timed(SavedTensorStore.unpack)


def _busy_seconds(events) -> float:
    """Union of the device intervals (kernels, copies, sets) in seconds."""
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in events
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start
    )
    busy, end = 0, None
    for start, stop in spans:
        if end is None or start > end:
            busy += stop - start
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    return busy / 1e6


def _sync_reporter(seen: dict):
    def show(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "memtool" in f.filename]
        where = (
            f"{Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].name}"
            if frames
            else "outside memtool"
        )
        seen[where] = seen.get(where, 0) + 1

    return show


def profile_mode(name: str, base, args, folder: Path, traces: Path | None) -> dict:
    changes, activations = MEMTOOL_MODES[name]
    holder: dict = {}
    syncs: dict = {}

    _STEP[0] = 1

    def on_step(step: int, loss: float) -> None:
        _STEP[0] = step + 1
        prof = holder["prof"]
        prof.step()
        if cuda and args.syncs and step == RECORDED_STEP - 1:
            torch.cuda.set_sync_debug_mode("warn")
        if cuda and args.syncs and step == RECORDED_STEP:
            torch.cuda.set_sync_debug_mode("default")

    run = TrainConfig(
        data=str(folder / "tokens.safetensors"), steps=RECORDED_STEP + 1, batch_size=1,
        seq_len=args.seq_len, compute_dtype="bfloat16", optim=OptimConfig(lr=1e-5), **changes,
    )  # fmt: skip
    cuda = args.device == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    wait = RECORDED_STEP - 1
    old_show = warnings.showwarning
    warnings.showwarning = _sync_reporter(syncs)
    warnings.simplefilter("always")
    try:
        with profile(activities=activities, schedule=schedule(wait=wait, warmup=0, active=1),
                     record_shapes=False, with_stack=False) as prof:  # fmt: skip
            holder["prof"] = prof
            train(
                run, folder / name.replace(" ", "_"), model=copy.deepcopy(base),
                device=args.device, show_progress=False, on_step=on_step, write_outputs=False,
                activations=ActivationConfig(**activations) if activations else None,
            )  # fmt: skip
    finally:
        warnings.showwarning = old_show
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
    events = prof.events()
    steps = [e for e in events if e.name.startswith("ProfilerStep")]
    wall_s = (
        (steps[-1].time_range.end - steps[-1].time_range.start) / 1e6 if steps else float("nan")
    )
    averages = prof.key_averages()
    hooks_s = HOOK_CLOCK.pop(RECORDED_STEP, 0.0)
    HOOK_CLOCK.clear()
    row = {
        "mode": name,
        "wall_s": wall_s,
        "device_busy_s": _busy_seconds(events),
        "hooks_host_s": hooks_s,
        "syncs": syncs,
    }
    print(json.dumps(row), flush=True)
    print(averages.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=50))
    if cuda:
        print(averages.table(sort_by="self_device_time_total", row_limit=12,
                             max_name_column_width=50))  # fmt: skip
    if traces is not None:
        traces.mkdir(parents=True, exist_ok=True)
        raw = folder / "trace.json"
        prof.export_chrome_trace(str(raw))
        target = traces / f"{name.replace(' ', '_')}.json.gz"
        with raw.open("rb") as src, gzip.open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--modes", default="memtool plain,memtool MEMO planned")
    parser.add_argument("--syncs", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--traces", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("this profile needs a CUDA device (or --device cpu --tiny for a smoke test)")
        return
    config = _config(args)
    rows = []
    base = build_model(config)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ids = torch.randint(0, config.vocab_size, (args.seq_len * 8,))
        save_file({"input_ids": ids}, str(folder / "tokens.safetensors"))
        for name in (m.strip() for m in args.modes.split(",")):
            rows.append(profile_mode(name, base, args, folder, args.traces))
            if args.device == "cuda":
                torch.cuda.empty_cache()
    print("\n| mode | step wall | device busy | busy share | host in hooks |")
    print("|---|---|---|---|---|")
    for r in rows:
        wall, busy = r["wall_s"] * 1e3, r["device_busy_s"] * 1e3
        print(f"| {r['mode']} | {wall:.1f} ms | {busy:.1f} ms | {busy / max(wall, 1e-9):.2f} "
              f"| {r['hooks_host_s'] * 1e3:.1f} ms |")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps({"device": args.device, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
