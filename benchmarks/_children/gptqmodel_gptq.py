"""Child process: GPTQModel 7.7 GPTQ on given calibration windows; prints JSON (time, RSS)."""

import contextlib
import json
import os
import resource
import sys
import time

import torch

src, out, calib, bits, group, damp = sys.argv[1:7]
sym = sys.argv[7:8] != ["asym"]  # optional 7th argument: "sym" (default) or "asym"
began = time.perf_counter()
with contextlib.redirect_stdout(sys.stderr):  # GPTQModel logs to stdout
    from gptqmodel import GPTQModel, QuantizeConfig

    config = QuantizeConfig(
        bits=int(bits), group_size=int(group), sym=sym, desc_act=True, damp_percent=float(damp)
    )
    model = GPTQModel.load(src, config, device="cpu")
    windows = torch.load(calib)
    data = [{"input_ids": w.tolist(), "attention_mask": [1] * len(w)} for w in windows]
    model.quantize(data, batch_size=1)
    model.save(out)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(
    json.dumps(
        {
            "seconds": round(time.perf_counter() - began, 1),
            "peak_rss_bytes": rss,
            "workers": os.environ.get("GPTQMODEL_CPU_WORKERS"),
        }
    )
)
