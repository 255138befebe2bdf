#!/usr/bin/env bash
# Train the reference ladder of recipes/wiki-ladder-profile.json and build its density profile.
#
# Five Llama models with SmolLM2's tokenizer (so the default model's density can be read against
# them), 36K to 907K non-embedding parameters (25x), trained alike from scratch on the built-in
# wiki split's calibration half: the same 200 steps of 4 x 512 tokens (410K tokens), AdamW at
# 2e-3 after a 20-step warmup, seed 0. The 49,152-token vocabulary's output layer dominates the
# cost of models this small, so more tokens or sizes cost hours on 2 cores; and at this budget a
# larger model no longer does better (1.77M parameters, hidden 192, scored worse than 907K), so
# the ladder stops at 907K. Then `memtool measure --build-profile ladder` measures each on the
# wiki evaluation half with the default protocol (32 windows x 512 tokens), fits
# L(N) = a N^-alpha + E and refits it to 100 resamples of the windows (parameter_sets).
# About 40 minutes on 2 CPU cores (BENCHMARKS.md has the measured times).
#
#   bash recipes/wiki-ladder.sh OUT_DIR      # writes OUT_DIR/wiki-ladder-profile.json
set -euo pipefail
out=${1:?usage: recipes/wiki-ladder.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
memtool=${MEMTOOL:-memtool}
mkdir -p "$out"
models=()
for size in l40 l64 l96 l128 l160; do
    if [ ! -f "$out/$size/model/config.json" ]; then
        $memtool train --from-config "$here/wiki-ladder/$size.json" -o "$out/$size" \
            --data wiki --steps 200 --batch-size 4 --seq-len 512 --lr 2e-3 --warmup-steps 20 \
            --seed 0 --export-dtype float32
    fi
    models+=("$out/$size/model")
done
$memtool measure "${models[@]}" --build-profile ladder --data wiki \
    --output "$out/wiki-ladder-profile.json"
