"""A model whose FFN neurons stream from a flash store, within a memory budget.

`open_flash_model` builds the model from a store folder without ever holding the bundled FFN
weights: the architecture comes from the store's config on the meta device, the resident
tensors are assigned in place, and each layer's FFN becomes a `FlashFFN` over a preallocated
`NeuronWindow`. The budget is split as

    resident tensors + predictors + KV cache (context tokens) + I/O staging + index arrays
    + per-layer neuron windows  <=  budget,

the windows taking what is left (at most every neuron of the layer). A budget that cannot hold
one neuron per layer after the rest is an error naming the minimum. `FlashEngine` is the
`InMemoryEngine` decode loop over that model (the same server, chat and CLI), with per-token
I/O and cache statistics.
"""

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from memtool.errors import MemtoolError
from memtool.formats.flash_store import open_flash_store
from memtool.models.layers import decoder_layers
from memtool.serve.engine import InMemoryEngine, StatsHook, TokenStats, cache_argument
from memtool.serve.flash.ffn import FlashCounters, FlashFFN
from memtool.serve.flash.io import DEFAULT_GAP_BYTES, NeuronReader
from memtool.serve.flash.sparsity import (
    LayerSelector,
    SparsityChoice,
    ffn_parts,
    load_predictors,
    parse_sparsity,
    summarize,
)
from memtool.serve.flash.window import NeuronWindow
from memtool.sizes import parse_size

DEFAULT_CONTEXT_TOKENS = 1024
MIN_CONTEXT_TOKENS = 128
DEFAULT_STAGING_BYTES = 4 << 20  # 16 reads of 256 KiB in flight: ~700 MB/s here (io.py)
DEFAULT_LEVEL = 0.5  # `--sparsity auto` for SwiGLU: 0.7+ garbles the default model (BENCHMARKS.md)


@dataclass(frozen=True)
class FlashConfig:
    """How to run a flash store.

    Attributes:
        memory_budget: bytes, a size ("150MB") or a share of the model's weight bytes ("50%").
        window_tokens: K: neurons used by the last K tokens stay in memory.
        io_threads: reads in flight at once.
        sparsity: "auto", "dense", or a calibrated SwiGLU level ("0.7").
        context_tokens: tokens the KV cache is reserved for (prompt + answer); None: see
            `plan_budget`.
        direct_io: read with O_DIRECT where the filesystem allows it.
        gap_bytes: read through gaps of unwanted bundles up to this size (0: exact reads);
            None: measured on the store's device when it is opened (`NeuronReader.measure_gap`:
            the bytes one read costs), as the best gap follows the device (on this project's
            VM 16-32 KiB one day, 64 KiB two days before).
        staging_bytes: the aligned read buffer; None: 4 MiB, or one layer's bundles if less.
        verify_store: check the neuron file's CRC32s too before serving (reads it whole once);
            the resident part is always checked, the neuron file's size always.
        lookahead: while a layer's attention computes, read the neurons its FFN is guessed to
            need (`FlashFFN.lookahead`). Off by default: on this project's VM it cut the I/O
            wait by a third on the default model but not the time per token (+-10%, within
            the noise), and on the OPT-1.3B shape it read 20% more bytes and lost 5-10%
            (random weights: the guess from before attention holds few of the neurons).
    """

    memory_budget: int | str = "50%"
    window_tokens: int = 4
    io_threads: int = 16  # reads in flight: 16 beat 8 and 32 on the OPT-1.3B shape here
    sparsity: str = "auto"
    context_tokens: int | None = None
    direct_io: bool = True
    gap_bytes: int | None = None
    staging_bytes: int | None = None
    verify_store: bool = False
    lookahead: bool = False


@dataclass
class BudgetPlan:
    """Where the budget goes, in bytes; `capacity` is each layer's window in neurons."""

    budget: int
    model_weight_bytes: int
    resident: int
    predictors: int
    kv_cache: int
    context_tokens: int
    staging: int
    index_arrays: int
    windows: int
    capacity: int
    n_neurons: int

    @property
    def total(self) -> int:
        return (
            self.resident + self.predictors + self.kv_cache + self.staging + self.index_arrays
        ) + self.windows


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _kv_bytes_per_token(config, itemsize: int, n_layers: int) -> int:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * n_layers * kv_heads * head_dim * itemsize


def plan_budget(
    budget: int | str,
    store_meta: dict,
    resident_bytes: int,
    predictor_bytes: int,
    kv_per_token: int,
    context_tokens: int | None,
    staging_bytes: int,
    max_context: int | None = None,
) -> BudgetPlan:
    """Split `budget` (see module doc); raises MemtoolError naming the minimum if too small.

    `context_tokens` None reserves the KV cache for the model's context, at most
    `DEFAULT_CONTEXT_TOKENS` and at most what a quarter of the budget left after the weights
    holds, but never fewer than `MIN_CONTEXT_TOKENS`.
    """
    layers = store_meta["layers"]
    ffn_weight_bytes = sum(layer["n_neurons"] * layer["bundle_bytes"] for layer in layers)
    weight_bytes = resident_bytes + ffn_weight_bytes
    if isinstance(budget, str) and budget.strip().endswith("%"):
        try:
            share = float(budget.strip()[:-1]) / 100
        except ValueError:
            raise MemtoolError(
                f"--memory-budget {budget!r}: use a size (150MB) or a percentage"
            ) from None
        if not 0 < share <= 1:
            raise MemtoolError(f"--memory-budget {budget} must be in (0%, 100%]")
        budget_bytes = int(share * weight_bytes)
    else:
        budget_bytes = parse_size(budget)
    n_neurons = max(layer["n_neurons"] for layer in layers)
    stride = max(layer["stride_bytes"] for layer in layers)
    n_layers = len(layers)
    # neuron_row per neuron, and row_neuron + last_used per window row: int64 each.
    index_fixed = 8 * sum(layer["n_neurons"] for layer in layers)
    per_neuron = n_layers * (stride + 16)
    if context_tokens is None:
        spare = budget_bytes - resident_bytes - predictor_bytes - staging_bytes - index_fixed
        context_tokens = min(max_context or DEFAULT_CONTEXT_TOKENS, DEFAULT_CONTEXT_TOKENS)
        context_tokens = min(context_tokens, max(spare // 4, 0) // max(kv_per_token, 1))
        context_tokens = max(context_tokens, min(MIN_CONTEXT_TOKENS, max_context or 1 << 30))
    if context_tokens < 1:
        raise MemtoolError(f"--context must be at least 1 token, not {context_tokens}")
    kv = kv_per_token * context_tokens
    fixed = resident_bytes + predictor_bytes + kv + staging_bytes + index_fixed
    minimum = fixed + per_neuron
    if budget_bytes < minimum:
        raise MemtoolError(
            f"memory budget {budget_bytes:,} bytes is below the minimum {minimum:,} for this "
            f"store: resident weights {resident_bytes:,} + predictors {predictor_bytes:,} + KV "
            f"cache {kv:,} ({context_tokens} tokens) + I/O staging {staging_bytes:,} + one "
            f"neuron per layer; raise --memory-budget or lower --context"
        )
    capacity = min(n_neurons, (budget_bytes - fixed) // per_neuron)
    return BudgetPlan(
        budget=budget_bytes,
        model_weight_bytes=weight_bytes,
        resident=resident_bytes,
        predictors=predictor_bytes,
        kv_cache=kv,
        context_tokens=context_tokens,
        staging=staging_bytes,
        index_arrays=index_fixed + 16 * n_layers * capacity,
        windows=n_layers * capacity * stride,
        capacity=capacity,
        n_neurons=n_neurons,
    )


@dataclass
class FlashModel:
    """A built flash model and what runs it."""

    model: nn.Module
    tokenizer: object
    plan: BudgetPlan
    reader: NeuronReader
    counters: FlashCounters
    ffns: list[FlashFFN]
    sparsity: SparsityChoice
    calibration: dict = field(default_factory=dict)
    folder: Path | None = None
    source: str | None = None
    gap_measurement: dict | None = None  # when the gap was measured at open
    lookahead: bool = False

    def close(self) -> None:
        self.reader.close()

    def describe(self) -> dict:
        """The run's setup for `--json` and the start-up line."""
        return {
            "store": str(self.folder),
            "budget": asdict(self.plan) | {"total": self.plan.total},
            "sparsity": self.sparsity.label,
            "calibration": self.calibration,
            "window_tokens": self.ffns[0].window.window_tokens if self.ffns else 0,
            "io_threads": self.reader.threads,
            "gap_bytes": self.reader.gap_bytes,
            "gap_measurement": self.gap_measurement,
            "lookahead": self.lookahead,
            "direct_io": self.reader.direct,
            "page_cache": self.reader.page_cache,
        }


def _selectors(store, predictors, choice: SparsityChoice, layers, resident: dict) -> list:
    tensors, meta = predictors if predictors is not None else ({}, None)
    key = "relu" if choice.level is None else str(choice.level)
    selectors = []
    for index, (layer, entry) in enumerate(zip(layers, store.layers, strict=True)):
        kind, _, act = ffn_parts(layer)
        selector = LayerSelector(choice.mode, kind, act, entry["n_neurons"])
        if choice.mode == "predictor":
            facts = meta["layers"][index][key]
            prefix = f"layers.{index}."
            if f"{prefix}qweight" in tensors:
                names = ("qweight", "qzeros", "scales", "g_idx")
                selector.packed = {n: tensors[prefix + n] for n in names}
                selector.bits = int(meta["predictor"].partition(":")[2])
            else:
                selector.a, selector.b = tensors[f"{prefix}a"], tensors[f"{prefix}b"]
            selector.bias = tensors.get(f"layers.{index}.bias")
            selector.predict_threshold = facts["predict"]
            selector.cats_threshold = facts.get("cats")
        elif choice.mode == "cats" and kind == "relu":  # fc1 resident: exact ReLU zeros
            prefix = next(p for p in resident if p.endswith(f".{index}.fc1.weight"))[:-7]
            selector.gate = resident[f"{prefix}.weight"]
            selector.bias = resident.get(f"{prefix}.bias")
        elif choice.mode == "cats":
            facts = meta["layers"][index][key]
            gate_name = next(p for p in resident if p.endswith(f".{index}.mlp.gate_proj.weight"))
            selector.gate = resident[gate_name]
            selector.cats_threshold = facts["cats"]
        selectors.append(selector)
    return selectors


def build_selectors(folder: Path, model: nn.Module, sparsity: str) -> tuple[list, SparsityChoice]:
    """The selectors a store's run would use, for a model holding the same weights: the
    masked-dense reference and quality measurements use them."""
    store = open_flash_store(folder, verify=False)
    try:
        predictors = load_predictors(Path(folder))
        choice = _choice(store, predictors, sparsity)
        resident = dict(model.state_dict())
        return _selectors(store, predictors, choice, decoder_layers(model), resident), choice
    finally:
        store.close()


def _choice(store, predictors, sparsity: str) -> SparsityChoice:
    choice = parse_sparsity(sparsity, store.kind, store.meta["gate_resident"], DEFAULT_LEVEL)
    exact_relu = choice.mode == "cats" and store.kind == "relu"  # needs no calibration
    if choice.mode != "dense" and not exact_relu and predictors is None:
        raise MemtoolError(
            f"{store.folder} holds no calibrated thresholds or predictors: rebuild it with "
            "memtool compress --method flash-store, or use --sparsity dense"
        )
    return choice


def open_flash_model(folder: Path, config: FlashConfig) -> FlashModel:
    """Build the streaming model from a store folder within `config.memory_budget`.

    Raises:
        MemtoolError: not a store, a damaged or truncated one, an unknown sparsity, or a
            budget below the minimum (named).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    # Sizes always; CRCs of everything with verify_store, else of the resident part below.
    store = open_flash_store(folder, verify=config.verify_store)
    try:
        predictors = load_predictors(folder)
        choice = _choice(store, predictors, config.sparsity)
        try:
            model_config = AutoConfig.from_pretrained(folder)
        except (OSError, ValueError) as exc:
            raise MemtoolError(
                f"{folder}: the store's config.json is missing or bad: {exc}"
            ) from exc
        resident = store.resident_state_dict(verify=not config.verify_store)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(model_config, dtype=store.dtype)
        layers = decoder_layers(model)
        if len(layers) != len(store.layers):
            raise MemtoolError(
                f"{folder}: config has {len(layers)} layers, store {len(store.layers)}"
            )
        resident_bytes = _tensor_bytes(resident.values())
        predictor_tensors = (
            list(predictors[0].values()) if predictors and choice.mode == "predictor" else []
        )
        max_context = getattr(model_config, "max_position_embeddings", None)
        region = max(layer["n_neurons"] * layer["stride_bytes"] for layer in store.layers)
        staging = config.staging_bytes or min(DEFAULT_STAGING_BYTES, -(-region // 4096) * 4096)
        itemsize = torch.empty(0, dtype=store.dtype).element_size()
        plan = plan_budget(
            config.memory_budget,
            store.meta,
            resident_bytes,
            _tensor_bytes(predictor_tensors),
            _kv_bytes_per_token(model_config, itemsize, len(layers)),
            config.context_tokens,
            staging,
            max_context,
        )
        reader = NeuronReader(
            folder / "ffn.bin",
            threads=config.io_threads,
            direct=config.direct_io,
            gap_bytes=DEFAULT_GAP_BYTES if config.gap_bytes is None else config.gap_bytes,
            staging_bytes=staging,
        )
    finally:
        store.close()
    gap_measurement = None
    if config.gap_bytes is None and store.layers:
        gap_measurement = reader.measure_gap(store.layers[0]["stride_bytes"])
        reader.gap_bytes = gap_measurement["gap_bytes"]
    counters = FlashCounters()
    selectors = _selectors(store, predictors, choice, layers, resident)
    names = {id(m): n for n, m in model.named_modules()}
    ffns = []
    for layer, entry, selector in zip(layers, store.layers, selectors, strict=True):
        capacity = min(plan.capacity, entry["n_neurons"])
        stride_elems = entry["stride_bytes"] // itemsize
        window = NeuronWindow(
            entry["n_neurons"], capacity, stride_elems, store.dtype, config.window_tokens
        )
        kind, _, act = ffn_parts(layer)
        replaced = [layer.mlp] if kind == "swiglu" else [layer.fc1, layer.fc2]
        out_linear = layer.mlp.down_proj if kind == "swiglu" else layer.fc2
        out_bias = resident.get(f"{names[id(out_linear)]}.bias")
        # What the replaced modules held is in the windows, the selector or out_bias now.
        for module in replaced:
            prefix = names[id(module)] + "."
            for key in [k for k in resident if k.startswith(prefix)]:
                del resident[key]
        ffn = FlashFFN(entry, kind, act, selector, window, reader, counters, out_bias)
        ffns.append(ffn)
        if config.lookahead:
            _start_lookahead(layer, ffn, kind)
        if kind == "swiglu":
            layer.mlp = ffn
        else:
            layer.fc1, layer.activation_fn, layer.fc2 = ffn, nn.Identity(), nn.Identity()
    _, unexpected = model.load_state_dict(resident, strict=False, assign=True)
    if unexpected:
        raise MemtoolError(f"{folder}: resident tensors the model does not have: {unexpected[:3]}")
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise MemtoolError(f"{folder}: the store lacks resident tensors {still_meta[:3]}")
    model.eval()
    tokenizer = _tokenizer(folder)
    calibration = summarize(predictors[1], choice) if predictors else {}
    return FlashModel(
        model,
        tokenizer,
        plan,
        reader,
        counters,
        ffns,
        choice,
        calibration,
        folder,
        store.meta.get("source"),
        gap_measurement,
        config.lookahead,
    )


def _start_lookahead(layer: nn.Module, ffn: FlashFFN, kind: str) -> None:
    """Run `ffn.lookahead` on the decoder layer's input, before its attention."""
    if kind == "swiglu":
        norm = layer.post_attention_layernorm
    else:  # OPT: fc1 reads final_layer_norm's output, or in post-norm layers the attention's
        norm = layer.final_layer_norm if layer.do_layer_norm_before else layer.self_attn_layer_norm
    ffn.lookahead_norm = norm

    def hook(_module, args, kwargs) -> None:
        ffn.lookahead(args[0] if args else kwargs["hidden_states"])

    layer.register_forward_pre_hook(hook, with_kwargs=True)


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError):
        return None


@dataclass
class _Loaded:
    """What `InMemoryEngine` reads off a loaded model."""

    model: nn.Module
    tokenizer: object
    source: str
    kind: str
    path: Path | None
    max_context: int | None


class FlashEngine(InMemoryEngine):
    """`InMemoryEngine` over a `FlashModel`: the same decode loop, plus per-token statistics
    (`token_log`: bytes read, reads, neurons loaded, cache hit rate, time split)."""

    def __init__(self, flash: FlashModel, model_name: str | None = None) -> None:
        if flash.tokenizer is None:
            raise MemtoolError(f"{flash.folder} has no tokenizer: it cannot serve text")
        loaded = _Loaded(
            flash.model,
            flash.tokenizer,
            str(flash.folder),
            "flash-store",
            flash.folder,
            flash.plan.context_tokens,
        )
        name = model_name or flash.source or flash.folder.name
        super().__init__(loaded, model_name=name, context_length=flash.plan.context_tokens)
        self.flash = flash
        self.token_log: list[dict] = []

    def generate(self, prompt_ids, params, on_token: StatsHook | None = None):
        tracker = TokenTracker(self.flash)

        def hook(stats: TokenStats) -> None:
            self.token_log.append(tracker.token(stats.seconds))
            if on_token is not None:
                on_token(stats)

        return super().generate(prompt_ids, params, hook)


class TokenTracker:
    """Turns the model's running counters into one record per token."""

    def __init__(self, flash: FlashModel) -> None:
        self.flash = flash
        self._io = flash.reader.stats.snapshot()
        self._counters = flash.counters.snapshot()

    def token(self, seconds: float) -> dict:
        io, counters = self.flash.reader.stats.snapshot(), self.flash.counters.snapshot()
        record = io.minus(self._io)
        for name in ("neurons_active", "neurons_loaded", "neurons_hit", "neurons_prefetched"):
            record[name] = getattr(counters, name) - getattr(self._counters, name)
        record["memory_seconds"] = counters.memory_seconds - self._counters.memory_seconds
        record["seconds"] = seconds
        record["compute_seconds"] = max(
            0.0, seconds - record["io_seconds"] - record["memory_seconds"]
        )
        self._io, self._counters = io, counters
        return record


def summarize_tokens(log: list[dict]) -> dict:
    """Per-token means over the decode tokens (the first, which reads the prompt, apart)."""
    if not log:
        return {}
    decode = log[1:] or log
    mean = lambda key: sum(r[key] for r in decode) / len(decode)  # noqa: E731
    reads = mean("reads")
    active = mean("neurons_active")
    return {
        "tokens": len(log),
        "first_token": log[0],
        "decode_tokens": len(decode),
        "bytes_read_per_token": mean("bytes_read"),
        "reads_per_token": reads,
        "mean_read_bytes": mean("bytes_read") / reads if reads else 0.0,
        "neurons_active_per_token": active,
        "neurons_loaded_per_token": mean("neurons_loaded"),
        "neurons_prefetched_per_token": mean("neurons_prefetched"),
        "cache_hit_rate": mean("neurons_hit") / active if active else 0.0,
        "io_seconds_per_token": mean("io_seconds"),
        "memory_seconds_per_token": mean("memory_seconds"),
        "compute_seconds_per_token": mean("compute_seconds"),
        "seconds_per_token": mean("seconds"),
        "tokens_per_s": len(decode) / sum(r["seconds"] for r in decode),
    }


def greedy_steps(
    flash_or_model,
    prompt_ids: list[int],
    new_tokens: int,
    before_token: Callable[[], None] | None = None,
    counters: Callable[[], dict[str, float]] | None = None,
) -> list[dict[str, float]]:
    """Greedy decoding with a plain KV-cache loop, one forward a token, measured: per forward
    its `token`, `seconds`, the seconds of `before_token` (run before it, untimed: cache
    eviction in benchmarks) as `before_seconds`, and the change of every cumulative value
    `counters()` returns (bytes read, ...). The first forward is the prefill."""
    from transformers import DynamicCache

    if new_tokens < 1:
        raise MemtoolError(f"new_tokens must be at least 1, not {new_tokens}")
    model = flash_or_model.model if isinstance(flash_or_model, FlashModel) else flash_or_model
    cache = DynamicCache(config=model.config)
    cache_arg = cache_argument(model)
    inputs = torch.tensor([list(prompt_ids)], dtype=torch.long)
    steps = []
    for _ in range(new_tokens):
        began = time.perf_counter()
        if before_token is not None:
            before_token()
        before_seconds = time.perf_counter() - began
        before = counters() if counters is not None else {}
        began = time.perf_counter()
        with torch.inference_mode():
            out = model(input_ids=inputs, use_cache=True, logits_to_keep=1, **{cache_arg: cache})
        token = int(out.logits[0, -1].argmax())
        seconds = time.perf_counter() - began
        after = counters() if counters is not None else {}
        steps.append({"token": token, "seconds": seconds, "before_seconds": before_seconds,
                      **{key: after[key] - before[key] for key in before}})  # fmt: skip
        inputs = torch.tensor([[token]], dtype=torch.long)
    return steps


def greedy_decode(
    flash_or_model, prompt_ids: list[int], new_tokens: int
) -> tuple[list[int], list[float]]:
    """Greedy ids and per-token seconds (`greedy_steps`; benchmarks, tests; also for stores
    without a tokenizer)."""
    steps = greedy_steps(flash_or_model, prompt_ids, new_tokens)
    return [int(step["token"]) for step in steps], [step["seconds"] for step in steps]
