"""Inference kernels on CUDA: the GPTQ and BitStack Triton paths checked against their
references, then timed beside cuBLAS on the dense float16 weight, with a tile sweep.

Checks (a failed one prints FAIL and the script exits 1), each on fresh random inputs, with the
output's memory poisoned with NaN first (so an unwritten element shows):

- GPTQ (`memtool.ops.triton.gptq_matmul`), both paths (GEMV; dequantize + cuBLAS): 2/3/4/8
  bits; static groups of 128, a ragged last group (576 inputs), act-order (shuffled g_idx) and
  one group per row; float32, float16 and bfloat16 activations; 1, 5 and 300 rows (GEMV up to
  16); with and without bias. float32 must match `memtool.ops.reference.gptq_linear` within
  1e-4 of the output's largest magnitude (another summation order). Half precision: GEMV
  against the float32 product with the exact weight, dequantize against the weight rounded to
  the activations' dtype (what each computes), within 2e-3 (float16) or 1e-2 (bfloat16) of the
  largest magnitude: the output's own rounding.
- BitStack (`memtool.ops.triton.bitstack_matmul`), both paths (fused; reconstruct + cuBLAS):
  1-6 blocks, ranks 2-16 (padded to 16), widths that are not multiples of 8 or of the tiles,
  float16 and float32 factors, the same activation dtypes, rows and tolerances (both paths
  round the weight for half-precision activations).
- BitStack's sign feedback (`memtool.ops.triton.sign_feedback`, the block loop of
  `memtool.compress.bitstack.feedback_signs`) against its Python loop on the CPU: at most 1e-4
  of the signs may differ (a fused multiply-add can flip a residual within a rounding of zero),
  row errors within 1e-3; timed against the Python loop on CUDA tensors for 7B-shaped layers.
- A model: a SmolLM2-135M-shaped Llama (random weights) with every decoder linear replaced by
  `GPTQLinear` (RTN 4-bit g128) gives the same logits on CUDA through Triton as on the CPU
  through the reference (float32), and greedy decoding time is compared with the float16 model.

Timings (`triton.testing.do_bench`, median, L2 flushed between calls so that decode reads its
weights from memory): per shape (K inputs x N outputs) and rows M, cuBLAS on the float16 weight,
the reference (dequantize or reconstruct, then matmul: what runs without the kernels), the
Triton op on `auto` and on each path, and with --sweep other tiles of the decode path at one
row. For M=1 the figure of merit is the weight bytes read per second; for large M, TFLOP/s.

    python benchmarks/gpu_linear_kernels.py [--sweep] [--out FILE.json]

Without CUDA it says so and exits 0. `--device cpu` under TRITON_INTERPRET=1 runs the checks at
small sizes in the Triton interpreter (no bfloat16 there, no model, no timing): a smoke test.
"""

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch

from memtool.formats.gptq_pack import pack_gptq
from memtool.formats.synthetic import random_bitstack_layer, random_gptq_layer
from memtool.ops import reference
from memtool.ops.triton.tiles import Tiles

HERE = Path(__file__).resolve().parent
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}
GRAPHS = False  # --graphs
failures: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}{f' ({detail})' if detail else ''}", flush=True)
    if not ok:
        failures.append(name)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.float().abs().max().clamp_min(1e-12)
    return float((actual.float() - expected.float()).abs().max() / scale)


def poison(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    """Free a NaN-filled block of the output's size: the caching allocator hands it out next."""
    if device.type == "cuda":
        block = torch.full(shape, float("nan"), dtype=dtype, device=device)
        del block


def compare(name, out, x, weight_t, bias, rounds_weight: bool) -> None:
    """Check `out` against `x @ weight_t + bias` computed as the kernel does for `x.dtype`.

    `weight_t` is the float32 reference weight `[in, out]`; a path that rounds it to
    half-precision activations' dtype before the product (`rounds_weight`) is held to that.
    """
    w = weight_t if not rounds_weight else weight_t.to(x.dtype).float()
    expected = x.float() @ w
    if bias is not None:
        expected = expected + bias.float()
    finite = bool(torch.isfinite(out).all())
    error = relative_error(out, expected) if finite else float("inf")
    limit = TOLERANCE[x.dtype]
    check(name, finite and error <= limit, f"{error:.1e} of max, limit {limit:.0e}")


def check_calls(device: torch.device) -> list[tuple[torch.dtype, int, bool]]:
    """(activation dtype, rows, bias) per checked call: decode and prefill tiles in every dtype,
    a ragged row count in float32. Few, since each combination is a compilation of the kernel."""
    dtypes = [torch.float32, torch.float16]
    if device.type == "cuda":
        dtypes.append(torch.bfloat16)  # the interpreter cannot run bfloat16 dots
    calls = [(dtype, 1, False) for dtype in dtypes] + [(torch.float32, 5, True)]
    if device.type == "cuda":
        calls += [(dtype, 300, True) for dtype in dtypes]
    return calls


def check_one(name, kernel, args, x, weight_t, bias, path, rounds_weight, reference_op) -> None:
    """One checked call of `kernel` on `path`, its output memory poisoned first."""
    poison((x.shape[0], weight_t.shape[1]), x.dtype, x.device)
    out = kernel(x, *args, bias, path=path)
    name = f"{name} {str(x.dtype)[6:]} M={x.shape[0]} {path}" + (
        " +bias" if bias is not None else ""
    )
    compare(name, out, x, weight_t, bias, rounds_weight and x.dtype != torch.float32)
    if x.dtype == torch.float32:
        error = relative_error(out, reference_op(x, *args, bias))
        check(name + " vs reference op", error <= 1e-4, f"{error:.1e}")


# --- GPTQ -----------------------------------------------------------------------------------


def gptq_layer(bits, in_features, out_features, group_size, shuffle, gen, device):
    layer = random_gptq_layer(bits, in_features, out_features, group_size, gen, shuffle=shuffle)
    return {name: t.to(device) for name, t in layer.packed.items()}


def gptq_args(layer, bits, in_features):
    return (layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], bits, in_features)


def check_gptq(device: torch.device) -> None:
    from memtool.ops.triton.gptq_matmul import triton_gptq_linear

    gen = torch.Generator().manual_seed(0)
    layouts = {
        "g128": (1024, 768, 128, False),
        "ragged g128": (576, 96, 128, False),
        "act-order": (1024, 768, 128, True),
        "per-row": (576, 1536, 576, False),
    }
    if device.type == "cpu":  # the interpreter: small layers only
        layouts = {"ragged g128": (576, 96, 128, False), "act-order": (256, 64, 128, True)}
    for bits in (2, 3, 4, 8):
        for layout, (k, n, group, shuffle) in layouts.items():
            layer = gptq_layer(bits, k, n, group, shuffle, gen, device)
            weight_t = reference.dequantize_gptq(*gptq_args(layer, bits, k))
            for dtype, rows, with_bias in check_calls(device):
                bias = torch.randn(n, generator=gen).to(device, dtype) if with_bias else None
                x = torch.randn(rows, k, generator=gen).to(device, dtype)
                # GEMV sums float32 products of the exact weight; dequantize rounds it first.
                for path, rounds in (("gemv", False), ("dequant", True)):
                    if path == "gemv" and rows > 16:
                        continue
                    check_one(f"GPTQ {bits}-bit {layout} {k}x{n}", triton_gptq_linear,
                              gptq_args(layer, bits, k), x, weight_t, bias, path, rounds,
                              reference.gptq_linear)  # fmt: skip


# --- BitStack -------------------------------------------------------------------------------


def bitstack_layer(out_features, in_features, rank, blocks, factor_dtype, gen, device):
    layer = random_bitstack_layer(out_features, in_features, rank, blocks, gen, dtype=factor_dtype)
    return {"signs": layer.packed_signs.to(device), "u": layer.u.to(device),
            "v": layer.v.to(device)}  # fmt: skip


def bitstack_args(layer, in_features):
    return (layer["signs"], layer["u"], layer["v"], in_features)


def check_bitstack(device: torch.device) -> None:
    from memtool.ops.triton.bitstack_matmul import triton_bitstack_linear

    gen = torch.Generator().manual_seed(1)
    cases = [  # (out, in, rank, blocks, factor dtype)
        (1536, 576, 7, 4, torch.float16),
        (576, 1536, 7, 3, torch.float16),
        (192, 576, 2, 6, torch.float16),
        (100, 203, 16, 2, torch.float16),
        (768, 1024, 16, 1, torch.float32),
        (96, 77, 5, 3, torch.float32),
    ]
    if device.type == "cpu":  # the interpreter: small layers only
        cases = [case for case in cases if case[0] * case[1] <= 100 * 203]
    for n, k, rank, blocks, factor_dtype in cases:
        layer = bitstack_layer(n, k, rank, blocks, factor_dtype, gen, device)
        weight_t = reference.bitstack_reconstruct(*bitstack_args(layer, k)).float().t()
        for dtype, rows, with_bias in check_calls(device):
            bias = torch.randn(n, generator=gen).to(device, dtype) if with_bias else None
            x = torch.randn(rows, k, generator=gen).to(device, dtype)
            # Both paths round the weight to half-precision activations' dtype for the product.
            for path in ("fused", "reconstruct"):
                check_one(f"BitStack {n}x{k} r{rank} b{blocks} {str(factor_dtype)[6:]} factors",
                          triton_bitstack_linear, bitstack_args(layer, k), x, weight_t, bias,
                          path, True, reference.bitstack_linear)  # fmt: skip


def feedback_problem(out_features: int, in_features: int, gen: torch.Generator):
    """A residual, magnitudes within 0.5-1.5x of its own, and the inverse Hessian factor of
    correlated inputs."""
    from memtool.compress.hessian import inverse_hessian_factor

    rest = torch.randn(out_features, in_features, generator=gen)
    magnitude = rest.abs() * (0.5 + torch.rand(out_features, in_features, generator=gen))
    mixing = torch.randn(in_features, in_features, generator=gen) / 8 + torch.eye(in_features)
    inputs = torch.randn(2 * in_features, in_features, generator=gen) @ mixing
    hinv_upper, _ = inverse_hessian_factor(inputs.T @ inputs, 0.3, 1.0)
    return rest, magnitude, hinv_upper


def check_sign_feedback(device: torch.device) -> None:
    """BitStack's sign feedback through the Triton block loop against the Python loop (the
    specification) on the CPU. Whether the update is one fused multiply-add may differ, so a
    residual within a rounding of zero may take the other sign: at most 1e-4 of the signs may
    differ, and the row errors must agree within 1e-3."""
    from memtool.compress.bitstack import feedback_signs

    gen = torch.Generator().manual_seed(3)
    cases = [(576, 576), (1536, 576), (130, 200)] if device.type == "cuda" else [(70, 150)]
    for out_features, in_features in cases:
        rest, magnitude, hinv_upper = feedback_problem(out_features, in_features, gen)
        rows = torch.zeros(out_features)
        expected = feedback_signs(rest, magnitude, hinv_upper, loop="python", row_error=rows)
        got_rows = torch.zeros(out_features, device=device)
        got = feedback_signs(rest.to(device), magnitude.to(device), hinv_upper.to(device),
                             loop="triton", row_error=got_rows).cpu()  # fmt: skip
        differ = float((got != expected).float().mean())
        error = float(((got_rows.cpu() - rows).abs() / rows.abs().clamp_min(1e-12)).max())
        check(f"sign feedback {out_features}x{in_features}", differ <= 1e-4 and error <= 1e-3,
              f"{differ:.1e} of signs differ, row errors within {error:.1e}")  # fmt: skip


def time_sign_feedback(device: torch.device, results: list) -> None:
    """One block's signs for a 7B-shaped layer: the Triton block loop against the Python loop
    on the same CUDA tensors (what ran on GPUs before), each including the inter-block updates
    (cuBLAS) they share."""
    from memtool.compress.bitstack import feedback_signs

    gen = torch.Generator().manual_seed(4)
    for out_features, in_features in ((4096, 4096), (11008, 4096), (1536, 576)):
        problem = [t.to(device) for t in feedback_problem(out_features, in_features, gen)]
        row = {"kernel": "sign feedback", "shape": f"{out_features}x{in_features}"}
        for loop in ("triton", "python"):
            feedback_signs(*problem, loop=loop)  # warm-up: compilation
            torch.cuda.synchronize()
            began = time.perf_counter()
            feedback_signs(*problem, loop=loop)
            torch.cuda.synchronize()
            row[f"{loop}_ms"] = (time.perf_counter() - began) * 1e3
        results.append(row)
        print(f"sign feedback {row['shape']}: triton {row['triton_ms']:.1f} ms, python loop "
              f"{row['python_ms']:.1f} ms ({row['python_ms'] / row['triton_ms']:.1f}x)",
              flush=True)  # fmt: skip


# --- a model --------------------------------------------------------------------------------


def smollm2_shaped(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
        tie_word_embeddings=True, rope_theta=100000.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def quantize_linears(model, bits: int = 4, group_size: int = 128) -> None:
    """Replace every decoder linear by a `GPTQLinear` holding its RTN codes."""
    from memtool.compress.quantizer import rtn_quantize
    from memtool.formats.gptq_linear import GPTQLinear

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                qw = rtn_quantize(child.weight, bits, group_size, sym=False)
                packed = pack_gptq(qw.codes.t().long(), qw.zeros.t(), qw.scales.t(), qw.g_idx, bits)
                setattr(parent, name, GPTQLinear.from_tensors(packed, bits))


def check_model(device: torch.device, new_tokens: int) -> list[dict]:
    """Logits through Triton on CUDA == the reference on CPU; decode time vs float16."""
    model = smollm2_shaped(layers=30)
    quantize_linears(model)
    ids = torch.randint(0, 49152, (2, 80), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cpu_logits = model(ids).logits
        model.to(device)
        cuda_logits = model(ids.to(device)).logits.cpu()
    error = relative_error(cuda_logits, cpu_logits)
    check("GPTQLinear model: CUDA Triton logits == CPU reference (float32)", error <= 1e-3,
          f"{error:.1e} of max")  # fmt: skip
    rows = []
    for label, build in (
        ("float16 dense", lambda: smollm2_shaped(30).half().to(device)),
        ("GPTQ 4-bit g128 (Triton)", lambda: model.half()),
    ):
        subject = build()
        prompt = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(3))
        prompt = prompt.to(device)
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        with torch.no_grad():
            subject.generate(prompt, **kwargs)  # warm-up: compiles and plans
            torch.cuda.synchronize(device)
            began = time.perf_counter()
            subject.generate(prompt, **kwargs)
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - began
        rows.append(
            {"model": label, "new_tokens": new_tokens, "tokens_per_s": new_tokens / seconds}
        )
        print(f"decode {label}: {new_tokens / seconds:.0f} tokens/s", flush=True)
    return rows


# --- timing ---------------------------------------------------------------------------------


def bench_ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def graph_bench_ms(fn) -> float:
    """`bench_ms` of one call captured in a CUDA graph: the GPU's time without Python's launch
    overhead (about 40 us per Triton call on the H200 machine of 2026-11-27, which made
    SmolLM2-sized layers take as long as 7B-sized ones)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: compilation, autotuning, handles
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench_ms(graph.replay)


SHAPES = {  # name: (in K, out N)
    "SmolLM2 up 576->1536": (576, 1536),
    "SmolLM2 down 1536->576": (1536, 576),
    "7B q/o 4096->4096": (4096, 4096),
    "7B up 4096->11008": (4096, 11008),
    "7B down 11008->4096": (11008, 4096),
}
# Tiles (BLOCK_M, BLOCK_N, BLOCK_K, warps) that --sweep times besides the defaults, at one row.
GEMV_SWEEP = [(1, n, k, 4) for n in (32, 64, 128) for k in (64, 128)] + [
    (1, 64, 128, 2),
    (1, 128, 128, 8),
]
FUSED_SWEEP = [(16, n, k, 4) for n in (32, 64, 128) for k in (32, 64)]


def time_row(kind, shape, rows, bits_label, k, n, results, contenders) -> None:
    """Time each `(label, call, weight bytes read)` per call and, with --graphs, replayed from
    a CUDA graph (`graph_ms`; rates from the graph time when there is one)."""
    flops = 2 * rows * k * n
    for label, fn, nbytes in contenders:
        try:
            ms = bench_ms(fn)
        except Exception as error:  # a tile that does not compile (resources) is reported
            print(f"  {label}: failed ({type(error).__name__}: {str(error)[:120]})", flush=True)
            continue
        graph_ms = None
        # Not the reference: a capture that fails part-way can leave the stream unusable, and
        # the reference's many small ops are not what the graphs are for.
        if GRAPHS and not label.startswith("reference"):
            try:
                graph_ms = graph_bench_ms(fn)
            except Exception as error:  # capture refused (a host sync in the call, say)
                print(f"  {label}: no graph ({type(error).__name__}: {str(error)[:120]})")
        best = graph_ms or ms
        row = {
            "kernel": kind, "shape": shape, "M": rows, "weights": bits_label, "contender": label,
            "ms": ms, "graph_ms": graph_ms, "weight_GBps": nbytes / best / 1e6,
            "TFLOPs": flops / best / 1e9,
        }  # fmt: skip
        results.append(row)
        graph_text = f" (graph {graph_ms * 1e3:.1f} us)" if graph_ms else ""
        print(f"  {kind} {shape} M={rows} {bits_label} {label}: {ms * 1e3:.1f} us{graph_text}, "
              f"{row['weight_GBps']:.0f} GB/s, {row['TFLOPs']:.1f} TFLOP/s")  # fmt: skip


def contenders_for(x, dense, packed_bytes, args, reference_op, kernel, paths, sweep):
    """cuBLAS on the float16 weight, the reference, the kernel on `auto` and on each path, and
    (one row) each swept tile shape on the decode path."""
    k, n = dense.shape
    part = functools.partial
    contenders = [
        ("cuBLAS fp16 dense", part(torch.matmul, x, dense), k * n * 2),
        ("reference", part(reference_op, x, *args), packed_bytes),
        ("triton auto", part(kernel, x, *args), packed_bytes),
    ]
    contenders += [(f"triton {p}", part(kernel, x, *args, path=p), packed_bytes) for p in paths]
    for tiles in sweep:
        call = part(kernel, x, *args, path=paths[0], tiles=Tiles(*tiles))
        contenders.append((f"triton {paths[0]} {tiles}", call, packed_bytes))
    return contenders


def time_gptq(device, sweep: bool, results: list) -> None:
    from memtool.ops.triton.gptq_matmul import triton_gptq_linear

    gen = torch.Generator().manual_seed(5)
    for shape, (k, n) in SHAPES.items():
        q_o = shape.startswith("7B q/o")
        for bits in (2, 3, 4, 8) if q_o else (4,):
            layer = gptq_layer(bits, k, n, 128, False, gen, device)
            args = gptq_args(layer, bits, k)
            packed_bytes = sum(t.numel() * t.element_size() for t in layer.values())
            dense = reference.dequantize_gptq(*args).half()
            # The GEMV/dequantize crossover at 4 bits on the 4096-wide layer.
            row_list = (1, 2, 4, 8, 16, 32, 2048) if q_o and bits == 4 else (1, 2048)
            for rows in row_list if bits == 4 else (1,):
                x = torch.randn(rows, k, generator=gen).to(device, torch.float16)
                tiles = GEMV_SWEEP if sweep and rows == 1 and bits == 4 and q_o else []
                paths = ("gemv", "dequant")
                contenders = contenders_for(
                    x, dense, packed_bytes, args, reference.gptq_linear, triton_gptq_linear,
                    paths, tiles,
                )  # fmt: skip
                time_row("GPTQ", shape, rows, f"{bits}-bit g128", k, n, results, contenders)


def time_bitstack(device, sweep: bool, results: list) -> None:
    from memtool.ops.triton.bitstack_matmul import triton_bitstack_linear

    gen = torch.Generator().manual_seed(6)
    configs = {  # shape: (rank, blocks) about 4-5 bits per weight
        "SmolLM2 up 576->1536": (7, 4),
        "7B q/o 4096->4096": (16, 4),
        "7B up 4096->11008": (16, 4),
    }
    for shape, (rank, blocks) in configs.items():
        k, n = SHAPES[shape]
        layer = bitstack_layer(n, k, rank, blocks, torch.float16, gen, device)
        args = bitstack_args(layer, k)
        packed_bytes = sum(t.numel() * t.element_size() for t in layer.values())
        dense = reference.bitstack_reconstruct(*args).half().t().contiguous()
        bits_label = f"r{rank} x{blocks} blocks ({8 * packed_bytes / (k * n):.2f} bits)"
        q_o = shape.startswith("7B q/o")
        for rows in (1, 4, 16, 64, 2048) if q_o else (1, 2048):
            x = torch.randn(rows, k, generator=gen).to(device, torch.float16)
            tiles = FUSED_SWEEP if sweep and rows == 1 and q_o else []
            paths = ("fused", "reconstruct")
            contenders = contenders_for(
                x, dense, packed_bytes, args, reference.bitstack_linear, triton_bitstack_linear,
                paths, tiles,
            )  # fmt: skip
            time_row("BitStack", shape, rows, bits_label, k, n, results, contenders)


def summary(results: list, field: str = "ms") -> None:
    """The table the reply shows: per kernel, shape and M, the best of each contender group,
    from per-call times (`ms`) or graph replays (`graph_ms`)."""
    print(f"\n{'per call' if field == 'ms' else 'CUDA graph replay'}:")
    print("| kernel | shape | M | weights | cuBLAS fp16 | reference | triton auto "
          "| best triton | its time | auto vs cuBLAS |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    keys = dict.fromkeys((r["kernel"], r["shape"], r["M"], r["weights"]) for r in results)
    for key in keys:
        rows = [r for r in results if (r["kernel"], r["shape"], r["M"], r["weights"]) == key]
        by = {r["contender"]: r[field] for r in rows if r.get(field)}
        dense = by.get("cuBLAS fp16 dense")
        ref = by.get("reference")
        default = by.get("triton auto")
        tritons = {c: v for c, v in by.items() if c.startswith("triton")}
        best_name, best = min(tritons.items(), key=lambda kv: kv[1]) if tritons else ("-", None)

        def us(v):
            return f"{v * 1e3:.1f} us" if v is not None else "-"

        ratio = f"{dense / default:.2f}x" if dense and default else "-"
        print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {us(dense)} | {us(ref)} "
              f"| {us(default)} | {best_name.removeprefix('triton ')} | {us(best)} "
              f"| {ratio} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--sweep", action="store_true", help="also time other tile shapes")
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument(
        "--graphs", action="store_true", help="also time each call replayed from a CUDA graph"
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gpu_linear_kernels.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    global GRAPHS
    GRAPHS = args.graphs
    if device.type == "cuda" and not torch.cuda.is_available():
        print("this check needs a CUDA device (or --device cpu under TRITON_INTERPRET=1)")
        return
    began = time.perf_counter()
    # The sign feedback first: it has not run on a GPU yet (the others passed on an H200).
    check_sign_feedback(device)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    if device.type == "cuda":
        report["sign_feedback"] = []
        time_sign_feedback(device, report["sign_feedback"])
    check_gptq(device)
    check_bitstack(device)
    print(f"kernel checks: {time.perf_counter() - began:.0f} s", flush=True)
    if device.type == "cuda":
        if not args.skip_model:
            report["decode"] = check_model(device, args.new_tokens)
        results: list[dict] = []
        time_gptq(device, args.sweep, results)
        time_bitstack(device, args.sweep, results)
        report["timings"] = results
        summary(results)
        if GRAPHS:
            summary(results, "graph_ms")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    report["failures"] = failures
    print(f"\n{len(failures)} failed checks; {time.perf_counter() - began:.0f} s in all")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
