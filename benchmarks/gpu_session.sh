#!/usr/bin/env bash
# Every GPU check memtool has, in one call on a lent GPU machine (about 8 minutes on an H200):
# the inference kernels (GPTQ, BitStack: checks, a model, timings and a tile sweep), then the
# training kernels and the training memory/speed table (gpu_train_check.py runs
# gpu_train_kernels.py itself). Logs and JSON go to $OUT (the device tool's folder) or, without
# it, benchmarks/results. Each script has its own time limit so one cannot starve the others.
#
#     bash benchmarks/gpu_session.sh
set -uo pipefail
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton",
triton.__version__, "transformers", transformers.__version__)'
status=0
timeout "${LINEAR_LIMIT_S:-300}" python3 benchmarks/gpu_linear_kernels.py --sweep --graphs \
    --out "$out/gpu_linear_kernels.json" >"$out/gpu_linear_kernels.log" 2>&1 || status=1
grep -v "^ok" "$out/gpu_linear_kernels.log" | grep -v "^  " | tail -60
# TRAIN_MODES (comma-separated row names) runs part of the table, e.g. rows a cut-off run lost.
timeout "${TRAIN_LIMIT_S:-220}" python3 benchmarks/gpu_train_check.py --layers 6 \
    ${TRAIN_MODES:+--modes "$TRAIN_MODES"} --out "$out/gpu_train_check.json" >"$out/gpu_train_check.log" 2>&1 || status=1
tail -40 "$out/gpu_train_check.log"
exit $status
