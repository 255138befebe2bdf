"""The ablation's last step, "+ bundling" (issue 5; "LLM in a flash" Table 2): the reads of a
real decode replayed against the bundled store and against the same weights unbundled.

1. memtool's flash engine decodes `--new-tokens` tokens of the default model (bf16, budget 50%,
   sparsity 0.5, window 4: the ablation's last row) and every read it asks of the store is
   logged (layer region, bundle stride, neuron ids), while it runs as usual.
2. Two files of the same weights and size are written to `--work` together: the bundled
   neuron file byte for byte, and an unbundled one: per layer, each part (gate rows, up rows,
   down columns) as its own contiguous matrix, rows unpadded (only spans need alignment,
   which the reader rounds out). One file each: three part files read by three readers came
   out 4x faster than either single file on this VM, an effect of the files, not the layout.
3. The logged reads are replayed with fresh O_DIRECT readers (the engine's reader and thread
   count), `--rounds` times alternating layouts: each logged call as is against the bundled
   file, and as one call per part at the part's matrix in the unbundled file. Both with the
   engine's coalescing across gaps and with exact reads (only the wanted neurons), where
   bundling matters: one read per run of neurons instead of one per part.

Only the I/O is replayed: the compute the engine does between reads is the same either way, so
tokens/s is not reported for the unbundled layout.

    python benchmarks/flash_bundling.py [--new-tokens 16] [--work /tmp/flash_bundling]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import flash_baselines as fb

from memtool.models import load_model
from memtool.models.builtin import ensure_builtin
from memtool.serve.flash.build import ensure_flash_store
from memtool.serve.flash.engine import FlashConfig, open_flash_model
from memtool.serve.flash.io import DEFAULT_GAP_BYTES, NeuronReader

PROMPT = "The history of the river city begins with a small market where"
MB = 1e6


def log_reads(store: Path, budget: int, prompt_ids: list[int], n: int) -> tuple[list, dict]:
    """Decode `n` tokens with the engine, logging every `stream(offset, stride, ids)` call."""
    calls: list[tuple[int, int, list[int]]] = []
    original = NeuronReader.stream

    def logged(self, offset, stride_bytes, ids, first_half=0):
        calls.append((offset, stride_bytes, list(ids)))
        return original(self, offset, stride_bytes, ids, first_half)

    NeuronReader.stream = logged
    config = FlashConfig(memory_budget=budget, context_tokens=128, sparsity="0.5")
    flash = open_flash_model(store, config)
    try:
        before = flash.reader.stats.snapshot()
        began = time.perf_counter()
        fb._greedy_decode(flash.model, prompt_ids, n)
        seconds = time.perf_counter() - began
        engine = flash.reader.stats.minus(before) | {"decode_seconds": seconds}
    finally:
        NeuronReader.stream = original
        flash.close()
    return calls, engine


def write_unbundled(store: Path, path: Path) -> dict[tuple[int, str], tuple[int, int]]:
    """The neuron file unbundled into `path`: per layer, each part (gate rows, up rows, down
    columns) as its own contiguous matrix, rows unpadded, each matrix 4 KiB-aligned. Returns
    (layer region offset, part) -> (offset in `path`, row bytes)."""
    meta = json.loads((store / "flash_store.json").read_text())
    itemsize = 2  # the default store is bfloat16
    source = np.memmap(store / "ffn.bin", dtype=np.uint8, mode="r")
    where: dict[tuple[int, str], tuple[int, int]] = {}
    with open(path, "wb") as file:
        for layer in meta["layers"]:
            n, stride, offset = layer["n_neurons"], layer["stride_bytes"], layer["offset"]
            region = source[offset : offset + n * stride].reshape(n, stride)
            for part in layer["layout"]:
                row, start = part["numel"] * itemsize, part["offset_bytes"]
                where[(offset, part["name"])] = (file.tell(), row)
                file.write(np.ascontiguousarray(region[:, start : start + row]).tobytes())
                file.write(b"\0" * (-file.tell() % 4096))
    return where


def replay(reader: NeuronReader, calls: list, where: dict | None) -> dict:
    """Run each logged call through `reader`: as logged (bundled), or (`where` given) as one
    call per part of the same neurons, at the part's matrix in the unbundled file."""
    before = reader.stats.snapshot()
    for offset, stride, ids in calls:
        places = [(offset, stride)] if where is None else [
            place for (region, _), place in where.items() if region == offset
        ]  # fmt: skip
        for place_offset, place_stride in places:
            for _ in reader.stream(place_offset, place_stride, ids):
                pass
    return reader.stats.minus(before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--work", type=Path, default=Path("/tmp/flash_bundling"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    store = ensure_flash_store(None, show=False)
    model_dir = ensure_builtin("smollm2-135m")
    budget = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) // 2
    prompt_ids = list(load_model(None).tokenizer(PROMPT)["input_ids"])
    calls, engine = log_reads(store, budget, prompt_ids, args.new_tokens)
    args.work.mkdir(parents=True, exist_ok=True)
    copy, unbundled = args.work / "ffn.bundled.bin", args.work / "ffn.unbundled.bin"
    where = write_unbundled(store, unbundled)
    copy.write_bytes((store / "ffn.bin").read_bytes())
    n = args.new_tokens
    rows: dict[str, list[dict]] = {}
    for gap_label, gap in (("coalesced (engine)", DEFAULT_GAP_BYTES), ("exact reads", 0)):
        readers = {"bundled": NeuronReader(copy, gap_bytes=gap),
                   "unbundled": NeuronReader(unbundled, gap_bytes=gap)}  # fmt: skip
        fb.drop_file_cache([args.work])
        for _ in range(args.rounds):
            for layout, reader in readers.items():
                run = replay(reader, calls, None if layout == "bundled" else where)
                rows.setdefault(f"{layout}, {gap_label}", []).append(run)
        direct = all(r.direct for r in readers.values())
        for reader in readers.values():
            reader.close()
    print(f"engine, {n} tokens: {engine['bytes_read'] / n / MB:.1f} MB/token, "
          f"{engine['reads'] / n:.0f} reads/token, {engine['io_seconds'] / n * 1e3:.0f} ms I/O "
          f"wait/token; O_DIRECT {direct}; the readers' default 8 threads")  # fmt: skip
    print("\n| layout (replayed reads) | MB read per token | reads per token "
          "| I/O wait ms/token, each round |")  # fmt: skip
    print("| --- | --- | --- | --- |")
    for label, runs in rows.items():
        row = runs[0]
        waits = ", ".join(f"{r['io_seconds'] / n * 1e3:.0f}" for r in runs)
        print(f"| {label} | {row['bytes_read'] / n / MB:.1f} | {row['reads'] / n:.0f} "
              f"| {waits} |")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps({"engine": engine, "tokens": n, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
