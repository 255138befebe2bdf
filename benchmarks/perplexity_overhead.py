"""Perplexity of the default model: memtool vs a plain transformers loop, side by side.

Checks the foundation issue's targets: memtool's perplexity on the built-in `wiki` evaluation
split is in the expected range and equals a plain transformers loop over the same windows to 4
significant digits, and memtool's throughput is >= 0.95x the plain loop's. The two loops run
interleaved (memtool, plain, memtool, plain, ...) on the same loaded model, so machine noise hits
both alike.

    python benchmarks/perplexity_overhead.py [--windows 16] [--rounds 4]
"""

import argparse
import json
import math
import statistics
import time

import torch

from memtool.data import evaluation_windows
from memtool.metrics import perplexity
from memtool.models import load_model


@torch.inference_mode()
def plain_loop(model, windows: torch.Tensor) -> tuple[float, float]:
    """What a user would write with transformers alone: loss per window, exp of the mean."""
    began = time.perf_counter()
    losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    return math.exp(sum(losses) / len(losses)), time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="wiki")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    loaded = load_model(args.model)
    data = evaluation_windows(args.data, loaded.tokenizer, args.seq_len, args.windows)
    windows = data.input_ids
    # Warm both paths up on one window, then alternate which runs first (ABBA) so drift in the
    # machine's load does not favour either.
    perplexity(loaded.model, windows[:1], show_progress=False)
    plain_loop(loaded.model, windows[:1])
    memtool_s, plain_s = [], []
    for round_index in range(args.rounds):
        order = ("memtool", "plain") if round_index % 2 == 0 else ("plain", "memtool")
        for which in order:
            if which == "memtool":
                ours = perplexity(loaded.model, windows, show_progress=False)
                memtool_s.append(ours.forward_seconds)
            else:
                plain_ppl, seconds = plain_loop(loaded.model, windows)
                plain_s.append(seconds)
    tokens = windows.numel()
    result = {
        "model": args.model,
        "data": data.to_dict(),
        "threads": torch.get_num_threads(),
        "memtool_perplexity": ours.perplexity,
        "plain_perplexity": plain_ppl,
        "match_4_significant_digits": f"{ours.perplexity:.4g}" == f"{plain_ppl:.4g}",
        "memtool_tokens_per_s": tokens / statistics.median(memtool_s),
        "plain_tokens_per_s": tokens / statistics.median(plain_s),
        "throughput_ratio_median": statistics.median(plain_s) / statistics.median(memtool_s),
        "throughput_ratio_best": min(plain_s) / min(memtool_s),
        "memtool_seconds": memtool_s,
        "plain_seconds": plain_s,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
