"""BitStack at run time on CPU: resizing vs loading, and reconstructing vs factored compute.

1. Resize: load a stack at a budget, then `set_budget` to +10% and -10%; compare with the time
   of a fresh load (best of --repeats each).
2. Per linear shape of the stack (16 blocks, its ranks), `x @ Wᵀ` three ways, for 1 token
   (decode) and 512 tokens (prefill):
   - reconstruct: W = Σ_j S_j ⊙ (u_j v_jᵀ) into a transient buffer, one matmul (what
     `BitStackLinear` does on CPU above 16 rows, through `memtool.ops.reference`);
   - factored: Σ_j Σ_k u_jk ⊙ ((x ⊙ v_jk) S_jᵀ), never forming u vᵀ;
   - the native lookup-table kernel (`memtool/ops/cpu/bitstack_gemv.cpp`), 1 token only.
3. Greedy decoding speed of the whole model at the budget vs the fp32 model (--new-tokens).

Usage: python benchmarks/bitstack_runtime.py STACK_DIR [--budget 200MB] [--repeats 5]
"""

import argparse
import functools
import statistics
import time

import torch

from memtool import load_model, ops
from memtool.formats.bitstack_linear import BitStackLinear
from memtool.formats.bitstack_pack import unpack_signs
from memtool.ops.reference import bitstack_linear
from memtool.sizes import format_size, parse_size


def _times(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return times


def factored(x, signs, u, v, in_features):
    out = x.new_zeros(x.shape[0], u.shape[1])
    for j in range(signs.shape[0]):
        s = unpack_signs(signs[j], in_features)
        xs = x.unsqueeze(0) * v[j].float().T.unsqueeze(1)  # [K, T, in]
        out += ((xs @ s.T) * u[j].float().T.unsqueeze(1)).sum(dim=0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stack")
    parser.add_argument("--budget", default="200MB")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(2)
    budget = parse_size(args.budget)

    load_s = min(_times(functools.partial(load_model, args.stack, budget=budget), args.repeats))
    loaded = load_model(args.stack, budget=budget)
    grow, shrink = [], []
    for _ in range(args.repeats):
        began = time.perf_counter()
        loaded.set_budget(int(budget * 1.1))
        grow.append(time.perf_counter() - began)
        began = time.perf_counter()
        loaded.set_budget(budget)
        shrink.append(time.perf_counter() - began)
    print(f"load at {format_size(budget)}: {load_s:.3f} s (best of {args.repeats})")
    print(f"grow +10%: {min(grow):.3f} s, shrink back -10%: {min(shrink):.3f} s")

    loaded.set_budget(None)
    shapes = {}
    for module in loaded.model.modules():
        if isinstance(module, BitStackLinear):
            shapes.setdefault((module.out_features, module.in_features, module.rank), module)
    print("\n| out x in | rank | blocks | tokens | reconstruct ms | factored ms | kernel ms |")
    print("|---|---|---|---|---|---|---|")
    for (m, n, k), module in shapes.items():
        for tokens in (1, 512):
            x = torch.randn(tokens, n)
            tensors = (module.signs, module.u, module.v, n)
            ref = bitstack_linear(x, *tensors)
            torch.testing.assert_close(factored(x, *tensors), ref, rtol=1e-3, atol=1e-3)
            r = statistics.median(
                _times(functools.partial(bitstack_linear, x, *tensors), args.repeats)
            )
            f = statistics.median(_times(functools.partial(factored, x, *tensors), args.repeats))
            kernel = "-"
            if tokens == 1:
                call = functools.partial(ops.bitstack_linear, x, *tensors, backend="cpu")
                kernel = f"{statistics.median(_times(call, args.repeats)) * 1e3:.2f}"
            print(
                f"| {m}x{n} | {k} | {module.n_blocks} | {tokens} | {r * 1e3:.1f} | "
                f"{f * 1e3:.1f} | {kernel} |"
            )

    loaded.set_budget(budget)
    dense = load_model(None)
    prompt = dense.tokenizer("The capital of France is", return_tensors="pt").input_ids
    for label, model in ((f"BitStack {format_size(budget)}", loaded.model), ("fp32", dense.model)):
        model.generate(prompt, max_new_tokens=2, do_sample=False)  # warm up
        began = time.perf_counter()
        out = model.generate(
            prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False
        )
        seconds = time.perf_counter() - began
        text = dense.tokenizer.decode(out[0, prompt.shape[1] :][:8])
        print(f"{label}: {args.new_tokens / seconds:.2f} tokens/s decoding ({text!r}...)")


if __name__ == "__main__":
    main()
