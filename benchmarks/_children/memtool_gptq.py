"""Child process: memtool GPTQ on given calibration windows; prints JSON with time and peak RSS.

Uses the library's layer-by-layer driver directly so both tools see the very same token windows
(`memtool compress` draws them itself from a data spec), set up as `compress` sets it up: the
checkpoint loaded in its stored dtype, finished layers' float weights dropped until the save,
the forwards in the dtype `--stats-dtype auto` picks on this machine.
"""

import json
import sys
import time

import torch

from memtool import load_model
from memtool.compress import GPTQConfig
from memtool.compress.methods import gptq_group_quantizer
from memtool.compress.precision import dtype_name, resolve_compute_dtype
from memtool.compress.sequential import quantize_sequential
from memtool.formats.gptq_checkpoint import gptq_quantization_config, save_gptq_checkpoint
from memtool.metrics import peak_rss_bytes

out, calib, bits, group, damp = sys.argv[1:6]
sym = sys.argv[6:7] != ["asym"]  # optional 6th argument: "sym" (default) or "asym"
began = time.perf_counter()
loaded = load_model("smollm2-135m", dtype="stored")
config = GPTQConfig(bits=int(bits), group_size=int(group), sym=sym, damp_percent=float(damp))
compute_dtype = resolve_compute_dtype(config.stats_dtype, torch.device("cpu"))
result = quantize_sequential(
    loaded.model,
    torch.load(calib),
    gptq_group_quantizer(config),
    show_progress=False,
    keep_weights=False,
    true_sequential=config.true_sequential,
    compute_dtype=compute_dtype,
)
quant_config = gptq_quantization_config(
    config.bits,
    config.group_size,
    config.sym,
    config.act_order,
    static_groups=config.static_groups,
    true_sequential=config.true_sequential,
)
save_gptq_checkpoint(loaded.model, loaded.tokenizer, result.weights, quant_config, out)
print(
    json.dumps(
        {
            "seconds": round(time.perf_counter() - began, 1),
            "phase_seconds": result.phase_seconds,
            "peak_rss_bytes": peak_rss_bytes(),
            "forward_dtype": dtype_name(compute_dtype),
        }
    )
)
