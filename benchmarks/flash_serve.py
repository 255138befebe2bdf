"""serve-local --memory-budget against its baselines, side by side in one run (issue 5).

Default model part (`--default`): smollm2-135m in bf16 (269 MB), budget 50% of its weight
bytes, greedy decoding of `--new-tokens` tokens after a short prompt:
- in RAM (the ceiling), accelerate's disk offload with its files evicted from the page cache
  before every token (cold), the naive baseline (every decoder layer re-read each token), and
  memtool's flash engine at several sparsities (O_DIRECT: the page cache plays no part);
- the ablation (the paper's Table 2): naive -> hybrid (attention resident, FFN streamed
  dense) -> + sparsity -> + windowing, with coalescing switched off for contrast;
- quality: perplexity of the masked dense model at each sparsity level (wiki evaluation), and
  whether the flash engine's tokens equal the masked dense model's;
- I/O efficiency: the engine's read throughput against plain parallel reads of the same file
  at the same read size and thread count.

Synthetic part (`--synthetic FOLDER`): an OPT-1.3B-shaped checkpoint (2.6 GB fp16, random
weights, fc1 biases set for ~10% active ReLU neurons; see `flash_baselines.make_synthetic_opt`)
at a 50% budget: accelerate (cold), naive, memtool.

    python benchmarks/flash_serve.py --default [--new-tokens 16] [--out results/flash_serve.json]
    python benchmarks/flash_serve.py --synthetic /tmp/flash_bench/opt-1.3b [--new-tokens 8]
    python benchmarks/flash_serve.py --synthetic /tmp/flash_bench/opt-1.3b --alternate 3
    python benchmarks/flash_serve.py --synthetic /tmp/flash_bench/opt-1.3b --ffn-ab 3
    python benchmarks/flash_serve.py --default --ffn-ab 3
    python benchmarks/flash_serve.py --synthetic /tmp/flash_bench/opt-1.3b --gap-ab 3
    python benchmarks/flash_serve.py --default --gap-ab 3
    python benchmarks/flash_serve.py --synthetic /tmp/flash_bench/opt-1.3b --lookahead-ab 3
    python benchmarks/flash_serve.py --default --lookahead-ab 3
    python benchmarks/flash_serve.py --default --versus-accelerate 3
    python benchmarks/flash_serve.py --gate   # gate+up+down bundles vs gate resident, at 75%
"""

import argparse
import gc
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import flash_baselines as fb

from memtool.data import evaluation_windows
from memtool.metrics.perplexity import perplexity
from memtool.models import load_model
from memtool.models.builtin import ensure_builtin
from memtool.serve.flash.build import FlashStoreConfig, build_flash_store
from memtool.serve.flash.engine import (
    FlashConfig,
    build_selectors,
    greedy_decode,
    open_flash_model,
)
from memtool.serve.flash.reference import masked_dense

PROMPT = "The history of the river city begins with a small market where"
MB = 1e6


def run_flash(store: Path, config: FlashConfig, prompt_ids: list[int], new_tokens: int) -> dict:
    """memtool's engine under the shared decode loop, with its own counters per token."""
    fb.drop_file_cache([store])
    gc.collect()
    reset = fb._reset_peak_rss()
    rss_before = fb._status_bytes("VmRSS")
    flash = open_flash_model(store, config)

    def counters() -> dict:
        io, c = flash.reader.stats, flash.counters
        return {
            "reader_bytes": io.bytes_read,
            "reader_wanted_bytes": io.bytes_wanted,
            "reads": io.reads,
            "io_seconds": io.seconds,
            "memory_seconds": c.memory_seconds,
            "neurons_active": c.neurons_active,
            "neurons_loaded": c.neurons_loaded,
            "neurons_hit": c.neurons_hit,
            "neurons_prefetched": c.neurons_prefetched,
        }

    try:
        decode = fb._greedy_decode(flash.model, prompt_ids, new_tokens, counters=counters)
        memory = fb._memory_report(reset, rss_before)
        plan = flash.describe()
    finally:
        flash.close()
    active = decode["neurons_active_per_token"]
    decode["cache_hit_rate"] = decode["neurons_hit_per_token"] / active if active else 0.0
    decode["mean_read_bytes"] = decode["reader_bytes_per_token"] / max(decode["reads_per_token"], 1)
    return {"system": "memtool-flash", "config": _config(config), **plan, **decode, **memory}


def run_cli(store: Path, budget: int, n: int, *options: str) -> dict:
    """`memtool serve-local STORE --memory-budget ...` in a fresh process: its peak RSS is the
    whole process's (Python, torch and the tokenizer included), not a share of this one's."""
    fb.drop_file_cache([store])
    command = [
        sys.executable,
        "-m",
        "memtool",
        "serve-local",
        str(store),
        "--memory-budget",
        str(budget),
        "--context",
        "128",
        "--prompt",
        PROMPT,
        "--max-tokens",
        str(n),
        "--json",
        *options,
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    payload = json.loads(done.stdout)
    per_token = payload["flash"]["per_token"]
    return {
        "system": "memtool serve-local (own process)",
        "tokens_per_s": per_token["tokens_per_s"],
        "read_bytes_per_token": per_token["bytes_read_per_token"],
        "peak_rss_bytes": payload["peak_rss_bytes"],
        "budget_total": payload["flash"]["budget"]["total"],
        "per_token": per_token,
    }


def run_naive_own_process(folder: Path, prompt_ids: list[int], n: int, work: Path) -> dict:
    """The naive baseline in a fresh process, like the CLI: a like-with-like ratio (a process
    that has already run other systems is slower: memtool's engine ran 17% slower in-process
    than as the CLI on the OPT-1.3B shape)."""
    code = (
        "import json, sys, torch; from pathlib import Path; "
        f"sys.path.insert(0, {str(Path(__file__).parent)!r}); import flash_baselines as fb; "
        "torch.set_num_threads(2); "
        f"r = fb.naive_stream_decode(Path({str(folder)!r}), {prompt_ids!r}, {n}, "
        f"dtype=torch.float16, work_folder=Path({str(work)!r})); "
        "print(json.dumps(r, default=str))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["system"] = "naive (own process)"
    return result


def _config(config: FlashConfig) -> dict:
    return {k: getattr(config, k) for k in ("memory_budget", "window_tokens", "sparsity")} | {
        "gap_bytes": config.gap_bytes,
        "io_threads": config.io_threads,
    }


def quality(store: Path, levels: list[str], windows: int) -> dict:
    """Perplexity of the masked dense model (float32) on wiki evaluation windows per level."""
    loaded = load_model(None, dtype="float32")
    ids = evaluation_windows("wiki", loaded.tokenizer, 512, windows).input_ids
    out = {}
    for level in levels:
        selectors, _ = build_selectors(store, loaded.model, level)
        with masked_dense(loaded.model, selectors):
            out[level] = perplexity(loaded.model, ids, show_progress=False).perplexity
        print(f"  perplexity {level}: {out[level]:.3f}", flush=True)
    return out


def token_identity(store: Path, budget, prompt_ids: list[int], n: int, dtype: str) -> dict:
    """The flash engine's greedy tokens against the dense in-memory model applying the same
    neuron masks: the masks the engine applied, recorded call by call (`FlashFFN.recorded`),
    so a threshold decision cannot flip on a rounding difference between the two."""
    out = {}
    model = load_model(None, dtype=dtype).model
    for sparsity in ("dense", "0.5"):
        flash = open_flash_model(
            store, FlashConfig(memory_budget=budget, context_tokens=128, sparsity=sparsity)
        )
        for ffn in flash.ffns:
            ffn.recorded = []
        got, _ = greedy_decode(flash, prompt_ids, n)
        recorded = [list(ffn.recorded) for ffn in flash.ffns]
        capacity = flash.plan.capacity
        flash.close()
        selectors, _ = build_selectors(store, model, sparsity)
        with masked_dense(model, selectors, recorded):
            want, _ = greedy_decode(model, prompt_ids, n)
        same = next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), n)
        out[sparsity] = {
            "tokens": n,
            "identical": got == want,
            "identical_prefix": same,
            "window_capacity": capacity,
        }
    return out


def _default_setup(args) -> tuple[Path, Path, int, list[int]]:
    """smollm2-135m and its flash store (built once), 50% budget, the prompt's ids."""
    model_dir = ensure_builtin("smollm2-135m")
    prompt_ids = list(load_model(None).tokenizer(PROMPT)["input_ids"])
    store = Path(args.work) / "smollm2-store"
    if not store.exists():
        print("building the flash store (once) ...", flush=True)
        build_flash_store(load_model(None, dtype="float32"), store, FlashStoreConfig())
    budget = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) // 2
    return model_dir, store, budget, prompt_ids


def default_part(args) -> dict:
    model_dir, store, budget, prompt_ids = _default_setup(args)
    weight_bytes = 2 * budget
    n = args.new_tokens
    results: dict = {"budget_bytes": budget, "weight_file_bytes": weight_bytes, "runs": {}}
    runs = results["runs"]

    def record(name: str, result: dict) -> None:
        runs[name] = result
        read = result.get("read_bytes_per_token") or 0
        print(
            f"{name:32s} {result['tokens_per_s']:6.2f} tokens/s  "
            f"{read / MB:7.1f} MB read/token  peak RSS {result['peak_rss_bytes'] / MB:6.0f} MB",
            flush=True,
        )

    def flash(name: str, **options) -> None:
        config = FlashConfig(memory_budget=budget, context_tokens=128, **options)
        record(name, run_flash(store, config, prompt_ids, n))

    record("in-memory", fb.run_in_memory(model_dir, prompt_ids, n))
    offload = Path(args.work) / "offload"
    record(
        "accelerate offload (cold)",
        fb.run_accelerate_offload(model_dir, budget, prompt_ids, n, offload),
    )
    record(
        "naive",
        fb.naive_stream_decode(model_dir, prompt_ids, n, work_folder=Path(args.work) / "naive"),
    )
    flash("hybrid (dense, no window)", sparsity="dense", window_tokens=0)
    flash("+ sparsity 0.5 (no window)", sparsity="0.5", window_tokens=0)
    flash("+ window 4 (sparsity 0.5)", sparsity="0.5", window_tokens=4)
    flash("  without coalescing", sparsity="0.5", window_tokens=4, gap_bytes=0)
    flash("sparsity 0.7, window 4", sparsity="0.7", window_tokens=4)
    flash("sparsity 0.9, window 4", sparsity="0.9", window_tokens=4)
    record("memtool CLI, sparsity 0.5 (own process)", run_cli(store, budget, n))
    main = runs["+ window 4 (sparsity 0.5)"]
    cold = runs["accelerate offload (cold)"]["tokens_per_s"]
    results["speedup_vs_accelerate_cold"] = main["tokens_per_s"] / cold
    results["speedup_vs_naive"] = main["tokens_per_s"] / runs["naive"]["tokens_per_s"]
    read_size = int(main["mean_read_bytes"])
    micro = fb.read_microbenchmark(store / "ffn.bin", read_size, threads=8)
    achieved = main["reader_bytes_per_token"] / main["io_seconds_per_token"]
    results["io_efficiency"] = {
        "engine_mb_per_s": achieved / MB,
        "microbenchmark": micro,
        "ratio": achieved / MB / micro["mb_per_s"],
    }
    print(
        f"I/O: engine {achieved / MB:.0f} MB/s, plain reads of {read_size} B "
        f"{micro['mb_per_s']:.0f} MB/s",
        flush=True,
    )
    results["identity"] = token_identity(store, budget, prompt_ids, 32, "bfloat16")
    print(f"token identity (32, bf16, same masks): {results['identity']}", flush=True)
    results["perplexity"] = quality(
        store, ["dense", "0.5", "0.6", "0.7", "0.8", "0.9"], args.ppl_windows
    )
    return results


def gate_part(args) -> dict:
    """SwiGLU bundles: gate+up+down with a 4-bit gate predictor, or up+down with the gate
    resident (exact CATS selection). At 50% the gate-resident store does not fit (its resident
    part alone is 61% of the weights), so both run at 75%."""
    model_dir = ensure_builtin("smollm2-135m")
    tokenizer = load_model(None).tokenizer
    prompt_ids = list(tokenizer(PROMPT)["input_ids"])
    stores = {"gate+up+down, quant:4 predictor": Path(args.work) / "smollm2-store"}
    stores["up+down, gate resident"] = Path(args.work) / "smollm2-store-gate"
    for store in stores.values():
        if not store.exists():
            config = FlashStoreConfig(gate_resident=store.name.endswith("gate"))
            build_flash_store(load_model(None, dtype="float32"), store, config)
    weight_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    budget = weight_bytes * 3 // 4
    out: dict = {"budget_bytes": budget, "runs": {}}
    for name, store in stores.items():
        config = FlashConfig(memory_budget=budget, context_tokens=128, sparsity="0.5")
        result = run_flash(store, config, prompt_ids, args.new_tokens)
        result["perplexity"] = quality(store, ["0.5"], args.ppl_windows)["0.5"]
        out["runs"][name] = result
        print(
            f"{name:34s} {result['tokens_per_s']:6.2f} tokens/s "
            f"{result['read_bytes_per_token'] / MB:7.1f} MB read/token, window "
            f"{result['budget']['capacity']} neurons, perplexity {result['perplexity']:.2f}",
            flush=True,
        )
    return out


def _synthetic_setup(args) -> tuple[Path, Path, int, list[int]]:
    """The OPT-1.3B-shaped model and its store (each built once), 50% budget, prompt ids."""
    folder = Path(args.synthetic)
    if not (folder / "config.json").exists():
        fb.make_synthetic_opt(folder, "opt-1.3b", active_fraction=0.1)
    if not (folder / "tokenizer.json").exists():  # memtool's loader wants one; ids < 50272 fit
        load_model(None).tokenizer.save_pretrained(folder)
    store = Path(args.work) / "opt-1.3b-store"
    if not store.exists():
        print("building the synthetic flash store (once) ...", flush=True)
        ids = torch.randint(0, 49152, (16, 256), generator=torch.Generator().manual_seed(0))
        config = FlashStoreConfig(predictor=args.synthetic_predictor)
        build_flash_store(load_model(folder, dtype="float32"), store, config, input_ids=ids)
        gc.collect()
    budget = sum(p.stat().st_size for p in folder.glob("*.safetensors")) // 2
    return folder, store, budget, list(range(100, 112))


def synthetic_part(args) -> dict:
    folder, store, budget, prompt_ids = _synthetic_setup(args)
    weight_bytes = 2 * budget
    n = args.new_tokens
    runs: dict = {}

    def record(name: str, result: dict) -> None:
        runs[name] = result
        print(
            f"{name:32s} {result['tokens_per_s']:6.3f} tokens/s  "
            f"{(result.get('read_bytes_per_token') or 0) / MB:8.1f} MB read/token  "
            f"peak RSS {result['peak_rss_bytes'] / MB:6.0f} MB",
            flush=True,
        )

    record("in-memory", fb.run_in_memory(folder, prompt_ids, n, dtype=torch.float16))
    record("memtool CLI, window 4 (own process)", run_cli(store, budget, n))
    record(
        "naive (own process)",
        run_naive_own_process(folder, prompt_ids, n, Path(args.work) / "naive-opt"),
    )
    record(
        "memtool flash (relu, window 4)",
        run_flash(store, FlashConfig(memory_budget=budget, context_tokens=128), prompt_ids, n),
    )
    record(
        "memtool flash (relu, no window)",
        run_flash(
            store,
            FlashConfig(memory_budget=budget, context_tokens=128, window_tokens=0),
            prompt_ids,
            n,
        ),
    )
    record(
        "memtool hybrid (dense)",
        run_flash(
            store,
            FlashConfig(memory_budget=budget, context_tokens=128, sparsity="dense"),
            prompt_ids,
            n,
        ),
    )
    record(
        "accelerate offload (cold)",
        fb.run_accelerate_offload(
            folder, budget, prompt_ids, n, Path(args.work) / "offload-opt", dtype=torch.float16
        ),
    )
    record(
        "naive",
        fb.naive_stream_decode(
            folder, prompt_ids, n, dtype=torch.float16, work_folder=Path(args.work) / "naive-opt"
        ),
    )
    main = runs["memtool flash (relu, window 4)"]["tokens_per_s"]
    cli = runs["memtool CLI, window 4 (own process)"]["tokens_per_s"]
    return {
        "budget_bytes": budget,
        "weight_file_bytes": weight_bytes,
        "runs": runs,
        "speedup_vs_accelerate_cold": main / runs["accelerate offload (cold)"]["tokens_per_s"],
        "speedup_vs_naive": main / runs["naive"]["tokens_per_s"],
        # Both in fresh processes: the like-with-like ratio.
        "speedup_vs_naive_own_process": cli / runs["naive (own process)"]["tokens_per_s"],
    }


def alternate_part(args) -> dict:
    """memtool's CLI and the naive baseline, each in fresh processes, alternating for
    `--alternate` rounds on the synthetic store: this VM's disk gets faster for a file read
    again soon after (the host caches it), so a single pass favours whichever system runs later."""
    folder, store, budget, prompt_ids = _synthetic_setup(args)
    n = args.new_tokens
    rounds = []
    for index in range(args.alternate):
        cli = run_cli(store, budget, n)["tokens_per_s"]
        naive = run_naive_own_process(folder, prompt_ids, n, Path(args.work) / "naive-opt")
        rounds.append({"cli": cli, "naive": naive["tokens_per_s"]})
        print(
            f"round {index}: CLI {cli:.3f}, naive {naive['tokens_per_s']:.3f} tokens/s", flush=True
        )
    ratios = sorted(r["cli"] / r["naive"] for r in rounds)
    return {"rounds": rounds, "ratio_median": ratios[len(ratios) // 2]}


def versus_accelerate_part(args) -> dict:
    """The default model: memtool's engine (sparsity 0.5, window 4: the ablation's last row)
    and accelerate's cold disk offload alternating for `--versus-accelerate` rounds in this
    process, each with its files evicted first, so that neither gains from running later."""
    model_dir, store, budget, prompt_ids = _default_setup(args)
    offload = Path(args.work) / "offload"
    config = FlashConfig(memory_budget=budget, context_tokens=128, sparsity="0.5", window_tokens=4)
    rounds = []
    for index in range(args.versus_accelerate):
        flash = run_flash(store, config, prompt_ids, args.new_tokens)["tokens_per_s"]
        cold = fb.run_accelerate_offload(model_dir, budget, prompt_ids, args.new_tokens, offload)
        rounds.append({"memtool": flash, "accelerate_cold": cold["tokens_per_s"]})
        print(
            f"round {index}: memtool {flash:.3f}, accelerate (cold) "
            f"{cold['tokens_per_s']:.3f} tokens/s: {flash / cold['tokens_per_s']:.2f}x",
            flush=True,
        )
    ratios = sorted(r["memtool"] / r["accelerate_cold"] for r in rounds)
    return {"rounds": rounds, "ratio_median": ratios[len(ratios) // 2]}


def ab_part(args, default: bool, variants: dict[str, tuple[dict, bool]]) -> dict:
    """Engine variants alternating for `--ffn-ab` / `--gap-ab` / `--lookahead-ab` rounds in this
    one process on one store: the synthetic OPT-1.3B shape, or (`default`) smollm2-135m at
    sparsity 0.5, window 4 (the ablation's last row). A variant is (FlashConfig options, native
    one-token FFN)."""
    from memtool.serve.flash.ffn import FlashFFN

    setup = _default_setup if default else _synthetic_setup
    _, store, budget, prompt_ids = setup(args)
    base = {"sparsity": "0.5", "window_tokens": 4} if default else {}
    rounds = []
    for index in range(_ab_rounds(args)):
        for name, (options, native) in variants.items():
            config = FlashConfig(memory_budget=budget, context_tokens=128, **base, **options)
            flash = open_flash_model(store, config)
            try:
                for ffn in (m for m in flash.model.modules() if isinstance(m, FlashFFN)):
                    ffn.native = None if native else False
                io = flash.reader.stats
                c = flash.counters
                before = (io.bytes_read, io.seconds, c.neurons_prefetched, c.neurons_loaded)
                decode = fb._greedy_decode(flash.model, prompt_ids, args.new_tokens)
                gap = flash.reader.gap_bytes
                # Per token over the whole run, prefill included (lookahead skips prompts).
                after = (io.bytes_read, io.seconds, c.neurons_prefetched, c.neurons_loaded)
                per_token = [(b - a) / args.new_tokens for a, b in zip(before, after, strict=True)]
            finally:
                flash.close()
            speed = decode["tokens_per_s"]
            rounds.append(
                {
                    "variant": name,
                    "gap_bytes": gap,
                    "tokens_per_s": speed,
                    "bytes_read_per_token": per_token[0],
                    "io_wait_s_per_token": per_token[1],
                    "neurons_prefetched_per_token": per_token[2],
                    "neurons_loaded_per_token": per_token[3],
                }
            )
            print(
                f"round {index}: {name} (gap {gap} B): {speed:.3f} tokens/s, "
                f"{per_token[0] / MB:.1f} MB read and {1000 * per_token[1]:.0f} ms I/O wait "
                f"a token, {per_token[2]:.0f} of {per_token[3]:.0f} neurons read ahead",
                flush=True,
            )
    return {"store": str(store), "rounds": rounds}


FFN_AB = {"native FFN": ({}, True), "torch FFN": ({}, False)}
GAP_AB = {
    "measured gap": ({"gap_bytes": None}, True),
    "64 KiB": ({"gap_bytes": 64 << 10}, True),
    "16 KiB": ({"gap_bytes": 16 << 10}, True),
}


LOOKAHEAD_AB = {
    "lookahead": ({"lookahead": True}, True),
    "no lookahead": ({"lookahead": False}, True),
}


def _ab_rounds(args) -> int:
    return args.ffn_ab or args.gap_ab or args.lookahead_ab


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--default", action="store_true", help="the default model part")
    parser.add_argument("--synthetic", default=None, help="folder of the OPT-1.3B-shaped model")
    parser.add_argument("--gate", action="store_true", help="gate-resident vs bundled gate")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument(
        "--synthetic-predictor",
        default="quant:4",
        help="predictor of the synthetic store (random weights defeat low rank)",
    )
    parser.add_argument("--ppl-windows", type=int, default=8)
    parser.add_argument(
        "--alternate", type=int, default=0, help="rounds of CLI vs naive, alternating"
    )
    parser.add_argument(
        "--ffn-ab", type=int, default=0, help="rounds of native vs torch FFN, alternating"
    )
    parser.add_argument(
        "--gap-ab", type=int, default=0, help="rounds of measured vs fixed gaps, alternating"
    )
    parser.add_argument(
        "--lookahead-ab", type=int, default=0, help="rounds with and without the lookahead"
    )
    parser.add_argument(
        "--versus-accelerate",
        type=int,
        default=0,
        help="with --default: rounds of memtool vs accelerate's cold offload, alternating",
    )
    parser.add_argument("--work", default="/tmp/flash_bench/work")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    began = time.perf_counter()
    report: dict = {"machine": platform.platform(), "torch": torch.__version__}
    if args.default and args.versus_accelerate:
        report["versus_accelerate"] = versus_accelerate_part(args)
    elif args.default and not _ab_rounds(args):
        report["default"] = default_part(args)
    if _ab_rounds(args):  # only the A/B, on the store of the part named
        variants = FFN_AB if args.ffn_ab else GAP_AB if args.gap_ab else LOOKAHEAD_AB
        report["ab"] = ab_part(args, args.default, variants)
    elif args.synthetic and args.alternate:
        report["alternate"] = alternate_part(args)
    elif args.synthetic:
        report["synthetic"] = synthetic_part(args)
    if args.gate:
        report["gate"] = gate_part(args)
    report["seconds"] = time.perf_counter() - began
    text = json.dumps(report, indent=1, default=str)
    if args.out:
        Path(args.out).write_text(text)
    print(f"done in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
