"""Greedy decoding on CPU: the fp32 model vs its 4-bit g128 GPTQ-layout twin, side by side.

Checks the CPU-decode issue's target: the quantized model (round-to-nearest, 4 bits, groups of
128, saved and reloaded in the GPTQ layout, so its linears are `GPTQLinear` running
`memtool.ops.gptq_linear`) decodes at >= 0.5x the fp32 model's tokens/s while holding <= 1/4 of
its linear-weight bytes. Both generate the same number of new tokens from the same prompt,
interleaved (fp32, quantized, fp32, quantized, ...) after a warm-up, so drift in the machine's
load hits both alike. `--crossover` instead times one `gptq_linear` call per row count on the
model's own layer shapes, native kernel vs reference: the numbers behind `CPU_MAX_ROWS`.
`--also DIR` (repeatable) decodes other quantized checkpoints of the model in the same rounds
(for example a GPTQ act-order one with dynamic groups, whose rows are sorted at load).

    python benchmarks/cpu_decode.py [--new-tokens 32] [--rounds 2] [--threads N] [--also DIR]
    python benchmarks/cpu_decode.py --crossover [--rows 1,8,16,32,64,128,256,512] [--threads N]
"""

import argparse
import functools
import json
import logging
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import memtool
from memtool.compress import RTNConfig, compress
from memtool.compress.layers import decoder_layers
from memtool.formats.gptq_linear import GPTQLinear
from memtool.formats.gptq_pack import pack_gptq
from memtool.ops import KernelBackend, gptq_backend_used, gptq_linear
from memtool.ops.cpu import cpu_kernel_status

PROMPT = "The history of the river city begins with a small market where"


class _BackendLog(logging.Handler):
    """Collects `memtool.ops` messages: which backend ran, the kernel's build time."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@torch.inference_mode()
def decode(loaded, input_ids: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    """Seconds to greedily generate exactly `new_tokens` tokens, and the tokens."""
    began = time.perf_counter()
    out = loaded.model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,  # same work for both models even if one would stop early
        pad_token_id=loaded.tokenizer.eos_token_id,
    )
    return time.perf_counter() - began, out[0, input_ids.shape[1] :]


def linear_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the decoder layers' linear weights as held: packed GPTQ tensors or fp32."""
    gptq = fp = 0
    for module in decoder_layers(model).modules():
        if isinstance(module, GPTQLinear):
            gptq += module.weight_storage_bytes()
        elif isinstance(module, nn.Linear):
            fp += module.weight.numel() * module.weight.element_size()
    return {"gptq_bytes": gptq, "dense_bytes": fp, "total": gptq + fp}


def compare_decoding(new_tokens: int, rounds: int, also: list[str]) -> dict:
    log = _BackendLog()
    logging.getLogger("memtool.ops").addHandler(log)
    logging.getLogger("memtool.ops").setLevel(logging.INFO)
    fp32 = memtool.load_model("smollm2-135m")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "rtn-4bit-g128"
        compress(None, RTNConfig(bits=4, group_size=128), output=folder, show_progress=False)
        quant = memtool.load_model(folder)
    models = {"fp32": fp32, "q4": quant, **{path: memtool.load_model(path) for path in also}}
    input_ids = fp32.tokenizer(PROMPT, return_tensors="pt").input_ids

    for loaded in models.values():  # warm-up: allocator, kernel build/load, first-use logs
        decode(loaded, input_ids, 4)
    seconds: dict[str, list[float]] = {name: [] for name in models}
    tokens = {}
    for _ in range(rounds):
        for name, loaded in models.items():
            elapsed, tokens[name] = decode(loaded, input_ids, new_tokens)
            seconds[name].append(elapsed)
    tokens_per_s = {k: new_tokens / statistics.median(v) for k, v in seconds.items()}
    fp32_bytes = linear_weight_bytes(fp32.model)["total"]
    q_bytes = linear_weight_bytes(quant.model)
    first = next(m for m in quant.model.modules() if isinstance(m, GPTQLinear))
    one_row = torch.zeros(1, first.in_features)
    return {
        "model": "smollm2-135m",
        "quantization": "rtn 4-bit g128, GPTQ layout",
        "prompt_tokens": input_ids.shape[1],
        "new_tokens": new_tokens,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "fp32_tokens_per_s": round(tokens_per_s["fp32"], 2),
        "q4_tokens_per_s": round(tokens_per_s["q4"], 2),
        "speed_ratio_q4_over_fp32": round(tokens_per_s["q4"] / tokens_per_s["fp32"], 3),
        "fp32_seconds": [round(s, 3) for s in seconds["fp32"]],
        "q4_seconds": [round(s, 3) for s in seconds["q4"]],
        "fp32_linear_weight_bytes": fp32_bytes,
        "q4_linear_weight_bytes": q_bytes["total"],
        "q4_dense_linear_bytes_left": q_bytes["dense_bytes"],
        "bytes_ratio_q4_over_fp32": round(q_bytes["total"] / fp32_bytes, 4),
        "decode_backend": gptq_backend_used(one_row, first.g_idx, first.bits, first.in_features),
        "cpu_kernel": cpu_kernel_status()[1],
        "ops_log": log.messages,
        "same_new_tokens": int((tokens["fp32"] == tokens["q4"]).sum()),
        "target_met": tokens_per_s["q4"] >= 0.5 * tokens_per_s["fp32"]
        and q_bytes["total"] <= fp32_bytes / 4,
        "also": {path: _also_row(models[path], tokens_per_s, seconds, path) for path in also},
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
    }


def _also_row(loaded, tokens_per_s: dict, seconds: dict, name: str) -> dict:
    first = next(m for m in loaded.model.modules() if isinstance(m, GPTQLinear))
    one_row = torch.zeros(1, first.in_features)
    return {
        "tokens_per_s": round(tokens_per_s[name], 2),
        "speed_ratio_over_fp32": round(tokens_per_s[name] / tokens_per_s["fp32"], 3),
        "seconds": [round(s, 3) for s in seconds[name]],
        "linear_weight_bytes": linear_weight_bytes(loaded.model)["total"],
        "rows_sorted_at_load": first.in_order is not None,
        "decode_backend": gptq_backend_used(one_row, first.g_idx, first.bits, first.in_features),
    }


def _best_ms(fn, min_seconds: float = 0.3) -> float:
    """Best of repeated calls: the least disturbed by other load on a shared machine."""
    fn()
    times, began = [], time.perf_counter()
    while time.perf_counter() - began < min_seconds or len(times) < 3:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def crossover(rows: list[int]) -> dict:
    """ms per `gptq_linear` call, cpu kernel vs reference, on smollm2's MLP shapes (4-bit g128)."""
    gen = torch.Generator().manual_seed(0)
    results = {}
    for in_f, out_f in ((576, 1536), (1536, 576)):
        n_groups = -(-in_f // 128)
        packed = pack_gptq(
            torch.randint(0, 16, (in_f, out_f), generator=gen),
            torch.randint(1, 17, (n_groups, out_f), generator=gen),
            torch.rand(n_groups, out_f, generator=gen) * 0.02,
            torch.arange(in_f) // 128,
            4,
        )
        args = (packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], 4, in_f)
        for m in rows:
            x = torch.randn(m, in_f, generator=gen)
            row = {}
            for backend in (KernelBackend.CPU, KernelBackend.REFERENCE):
                call = functools.partial(gptq_linear, x, *args, backend=backend)
                row[backend.value] = round(_best_ms(call), 3)
            results[f"{in_f}x{out_f} rows={m}"] = row
    return {"threads": torch.get_num_threads(), "ms_per_call": results}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--crossover", action="store_true")
    parser.add_argument("--rows", default="1,4,8,16,32,64,128,256,512")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--also", action="append", default=[], help="another quantized folder")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.crossover:
        result = crossover([int(r) for r in args.rows.split(",")])
    else:
        result = compare_decoding(args.new_tokens, args.rounds, args.also)
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
