"""`measure`: perplexity, sizes, bits per weight, memory and speed of one model.

The library call behind `memtool measure`. Everything is computed on CPU in float32 unless the
config says otherwise; the report names the data, split, window count and protocol it used so
two numbers are only compared when they were measured the same way.
"""

import math
import time
from dataclasses import asdict, dataclass, field, replace

from memtool import __version__
from memtool.data import evaluation_windows
from memtool.errors import MemtoolError
from memtool.metrics import (
    PROTOCOL,
    count_params,
    linear_bits_per_weight,
    model_bits_per_weight,
    peak_rss_bytes,
    perplexity,
    weight_bytes,
)
from memtool.metrics.density import (
    DEFAULT_TIME_RATIO,
    bootstrap_density,
    build_ladder_profile,
    capacity_density,
    effective_params,
    inference_time_density,
    ladder_parameter_sets,
    load_profile,
    parameter_set_density,
    protocol_flags,
)
from memtool.models import LoadedModel, load_model
from memtool.sizes import parse_size

DEFAULT_MAX_WINDOWS = 32


@dataclass
class MeasureConfig:
    """What to measure and how.

    Attributes:
        data: data spec for evaluation (see `memtool.data.parse_data_spec`).
        seq_len: window length in tokens.
        max_windows: evaluate the first N windows of the split; None means all of them.
        dtype: compute dtype the model is loaded in (when `measure` loads it).
        batch_size: windows per forward call.
        allow_pickle: permit pickle checkpoints when loading.
        show_progress: draw progress bars on stderr.
        budget: for a BitStack stack, the weight bytes to load ("300MB" or bytes).
        density_profile: a reference profile file (`memtool.metrics.density`); adds N_hat,
            capacity density with its bootstrap interval, and inference-time density.
        time_ratio: r of the inference-time density (compute time / memory time per parameter).
        tasks: lm-eval tasks to score the model on (`memtool.metrics.tasks`): .jsonl / .yaml
            files or task names; needs the optional lm-eval install.
        task_limit: score at most this many items of each task (None: all).
    """

    data: str = "wiki"
    seq_len: int = 512
    max_windows: int | None = DEFAULT_MAX_WINDOWS
    dtype: str = "float32"
    batch_size: int = 1
    allow_pickle: bool = False
    show_progress: bool = True
    budget: int | str | None = None
    density_profile: str | None = None
    time_ratio: float = DEFAULT_TIME_RATIO
    tasks: tuple[str, ...] = ()
    task_limit: int | None = None

    def validate(self) -> None:
        if self.task_limit is not None and self.task_limit < 1:
            raise MemtoolError(f"--task-limit must be at least 1, not {self.task_limit}")
        if self.tasks:  # a bad task file fails before the model loads
            from memtool.metrics.tasks import resolve_tasks

            resolve_tasks(list(self.tasks))
        for name in ("seq_len", "batch_size", "max_windows"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                flag = "--" + name.replace("_", "-")
                raise MemtoolError(f"{flag} must be a positive number, got {value}")
        if self.seq_len < 2:
            raise MemtoolError("--seq-len must be at least 2 (one token predicts the next)")
        if not self.time_ratio >= 0:
            raise MemtoolError(f"--time-ratio must be 0 or more, not {self.time_ratio}")


@dataclass
class MeasureReport:
    """Everything `memtool measure` reports; `to_dict()` is its JSON form."""

    model: str
    model_kind: str
    dtype: str
    perplexity: float
    nll_mean: float
    eval_tokens: int
    predicted_tokens: int
    windows: int
    seq_len: int
    data: str
    split: str
    data_fingerprint: str
    available_tokens: int
    protocol: str
    params_total: int
    params_non_embedding: int
    bytes_on_disk: int
    weight_bytes: int
    bits_per_weight: float
    bits_per_weight_linear: float
    peak_rss_bytes: int
    tokens_per_s: float
    forward_seconds: float
    load_seconds: float
    kv_cache_bytes: int  # per evaluation batch at its full length, beside the weights
    # Summed NLL and predicted tokens of each forward batch: what bootstraps resample.
    batch_nll_sums: list[float] = field(default_factory=list)
    batch_predicted_tokens: list[int] = field(default_factory=list)
    budget_bytes: int | None = None  # BitStack: the budget the model was loaded or resized to
    stack_blocks: int | None = None  # BitStack: residual blocks held
    resize_seconds: float | None = None  # BitStack sweeps: time to grow to this budget
    # With a density profile (None otherwise): see `memtool.metrics.density`.
    density_profile: str | None = None
    effective_params: float | None = None  # N_hat, or the bound on it
    effective_params_bound: str | None = None  # "", ">" or "<"
    capacity_density: float | None = None  # N_hat / params_non_embedding
    capacity_density_interval: list[float] | None = None  # 90%, bootstrap over windows
    inference_time_density: float | None = None
    inference_time_ratio: float | None = None  # the r used
    density_flags: list[str] | None = None
    # With tasks (None otherwise): {task: {metric: value, "samples": n}}, lm-eval's metric names.
    task_scores: dict[str, dict] | None = None
    memtool_version: str = __version__
    conventions: dict = field(
        default_factory=lambda: {
            "params_non_embedding": "excludes nn.Embedding tables and the output head",
            "weight_bytes": "parameters + persistent buffers in memory, tied tensors once",
            "bits_per_weight": "8 * weight_bytes / params_total",
            "bits_per_weight_linear": "storage bits / weights of the body's linear layers",
            "peak_rss_bytes": "peak resident memory of the process, loading included",
            "tokens_per_s": "eval_tokens / forward_seconds",
            "kv_cache_bytes": "keys and values of one batch of windows, not in weight_bytes",
            "batch_nll_sums": "summed NLL (nats) of each forward batch, beside "
            "batch_predicted_tokens",
            "capacity_density": "N_hat / params_non_embedding (Densing Law), median of the "
            "bootstrap over evaluation windows; interval 5%-95% of log density",
            "inference_time_density": "N_hat (1 + r) / (N * bits_per_weight / 16 + N * r)",
        }
    )

    def to_dict(self) -> dict:
        return asdict(self)


def measure(
    model: str | LoadedModel | None = None, config: MeasureConfig | None = None
) -> MeasureReport:
    """Measure a model: a source to load (None = the default model) or a loaded model.

    Raises:
        MemtoolError: bad config, data or model (the message says what to fix).
    """
    config = config or MeasureConfig()
    config.validate()
    # Read the profile before the (slow) load and evaluation, so a bad one fails at once.
    profile = load_profile(config.density_profile) if config.density_profile else None
    began = time.perf_counter()
    loaded = (
        model
        if isinstance(model, LoadedModel)
        else load_model(
            model, dtype=config.dtype, allow_pickle=config.allow_pickle, budget=config.budget
        )
    )
    load_s = time.perf_counter() - began
    if profile is not None and "tokenizer" in profile.protocol:
        from memtool.comparison import tokenizer_fingerprint  # comparison imports this module

        check_profile_tokenizer(profile, tokenizer_fingerprint(loaded.tokenizer), loaded.source)
    context = loaded.max_context
    if context is not None and config.seq_len > context:
        raise MemtoolError(
            f"--seq-len {config.seq_len} is above the model's context of {context} tokens; "
            f"use --seq-len {context} or less"
        )
    windows = evaluation_windows(
        config.data, loaded.tokenizer, seq_len=config.seq_len, max_windows=config.max_windows
    )
    result = perplexity(
        loaded.model, windows.input_ids, config.batch_size, show_progress=config.show_progress
    )
    total, non_embedding = count_params(loaded.model)
    dtype = loaded.model.get_input_embeddings().weight.dtype
    stack = loaded.bitstack
    scores = None
    if config.tasks:
        from memtool.metrics.tasks import task_scores

        scores = task_scores(loaded, list(config.tasks), config.task_limit, config.batch_size)
    report = MeasureReport(
        model=loaded.source,
        model_kind=loaded.kind,
        dtype=str(dtype).removeprefix("torch."),
        perplexity=result.perplexity,
        nll_mean=result.nll_mean,
        eval_tokens=result.fed_tokens,
        predicted_tokens=result.predicted_tokens,
        windows=result.windows,
        seq_len=config.seq_len,
        data=windows.data,
        split=windows.split,
        data_fingerprint=windows.fingerprint,
        available_tokens=windows.available_tokens,
        protocol=PROTOCOL,
        params_total=total,
        params_non_embedding=non_embedding,
        bytes_on_disk=loaded.bytes_on_disk,
        weight_bytes=weight_bytes(loaded.model),
        bits_per_weight=model_bits_per_weight(loaded.model),
        bits_per_weight_linear=linear_bits_per_weight(loaded.model),
        peak_rss_bytes=peak_rss_bytes(),
        tokens_per_s=result.tokens_per_s,
        forward_seconds=result.forward_seconds,
        load_seconds=load_s,
        kv_cache_bytes=kv_cache_bytes(
            loaded.model.config, config.batch_size * config.seq_len, dtype.itemsize
        ),
        batch_nll_sums=list(result.batch_nll_sums),
        batch_predicted_tokens=list(result.batch_predicted_tokens),
        budget_bytes=None if config.budget is None else parse_size(config.budget),
        stack_blocks=stack.n_blocks if stack is not None else None,
        task_scores=scores,
    )
    if profile is None:
        return report
    density = _density(profile, result, report, config, profile_score(profile, scores))
    return replace(report, **density)


def check_profile_tokenizer(profile, fingerprint: str, source: str) -> None:
    """MemtoolError when the profile names a tokenizer (a ladder's) other than the model's."""
    expected = profile.protocol.get("tokenizer")
    if expected is not None and fingerprint != expected:
        raise MemtoolError(
            f"{source} does not share the tokenizer of the density profile's ladder: "
            "its loss per token is not comparable; use a profile built from its family"
        )


def build_ladder(models: list[str], config: MeasureConfig) -> dict:
    """A ladder density profile (`memtool.metrics.density`) from reference models measured with
    `config`'s protocol: their non-embedding parameters and held-out loss.

    Raises:
        MemtoolError: fewer than two models, models with different tokenizers, or a bad model.
    """
    if len(models) < 2:
        raise MemtoolError("a ladder needs at least two reference models")
    from memtool.comparison import check_same_tokenizer  # comparison imports this module

    tokenizer = check_same_tokenizer(models)
    plain = replace(config, density_profile=None, tasks=())
    reports = [measure(source, plain) for source in models]
    first = reports[0]
    protocol = {
        **density_protocol(first),
        "tokenizer": tokenizer,
        "models": [r.model for r in reports],
    }
    points = [(r.params_non_embedding, r.nll_mean) for r in reports]
    profile = build_ladder_profile(points, protocol)  # validates before the resampling
    if "fit" not in profile:
        return profile
    # The reference's own uncertainty: the fit to resampled evaluation windows of every model.
    sets = ladder_parameter_sets(
        [r.params_non_embedding for r in reports],
        [(r.batch_nll_sums, r.batch_predicted_tokens) for r in reports],
    )
    return build_ladder_profile(points, protocol, sets)


def density_protocol(report: "MeasureReport") -> dict:
    """The protocol facts a ladder profile records and a density check compares."""
    return {
        "data": report.data,
        "split": report.split,
        "seq_len": report.seq_len,
        "windows": report.windows,
        "fingerprint": report.data_fingerprint,
        "protocol": report.protocol,
    }


def profile_score(profile, scores: dict | None) -> float | None:
    """The task score a densing profile's sigmoid takes: its protocol's `task` (and `metric`,
    default acc) when that task was scored; None otherwise (N_hat then comes from the loss)."""
    task = profile.protocol.get("task") if profile is not None else None
    if task is None or "c" not in profile.constants or not scores or task not in scores:
        return None
    metric = profile.protocol.get("metric", "acc")
    if metric not in scores[task]:
        raise MemtoolError(
            f"the density profile reads {metric!r} of task {task!r}, which lm-eval did not report"
        )
    return float(scores[task][metric])


def _density(
    profile, result, report: MeasureReport, config: MeasureConfig, score: float | None = None
) -> dict:
    """The density fields of `report` (see `memtool.metrics.density`). With a task `score`
    (a densing profile's task), N_hat inverts the score law and no window bootstrap applies."""
    non_embedding, bits = report.params_non_embedding, report.bits_per_weight
    estimate = effective_params(profile, loss=result.nll_mean, score=score)
    flags = list(estimate.flags) + list(protocol_flags(profile, density_protocol(report)))
    if score is not None:
        flags.append(f"from the score of task {profile.protocol['task']}")
    rho = capacity_density(estimate.value, non_embedding)
    interval = None
    if estimate.bound:
        # Only one side is known: resampling would mix the bound with extrapolations.
        flags.append("N_hat is a bound: no interval")
    elif score is not None:
        # No windows to resample for a task score: the interval spans the profile's own sets.
        if profile.parameter_sets:
            rho, (low, high), more = parameter_set_density(profile, non_embedding, score=score)
            interval = [low, high]
            flags += more
        else:
            flags.append("task score without parameter sets: no interval")
    elif len(result.batch_nll_sums) > 1 and 0 < estimate.value < math.inf:
        median, (low, high), more = bootstrap_density(
            profile, result.batch_nll_sums, result.batch_predicted_tokens, non_embedding
        )
        rho, interval = median, [low, high]
        flags += more
    elif len(result.batch_nll_sums) <= 1:
        flags.append("one evaluation batch: no interval")
    time_density = inference_time_density(
        estimate.value, non_embedding, bits, time_ratio=config.time_ratio
    )
    return {
        "density_profile": profile.source,
        "effective_params": estimate.value,
        "effective_params_bound": estimate.bound,
        "capacity_density": rho,
        "capacity_density_interval": interval,
        "inference_time_density": time_density,
        "inference_time_ratio": config.time_ratio,
        "density_flags": flags,
    }


def measure_budgets(
    model: str, budgets: list[int | str], config: MeasureConfig | None = None
) -> list[MeasureReport]:
    """Measure a BitStack stack at each budget, smallest first, resizing one loaded model in
    place between them (each report's `resize_seconds` says how long that took)."""
    config = config or MeasureConfig()
    sizes = sorted(parse_size(b) for b in budgets)
    if not sizes:
        raise MemtoolError("--budgets needs at least one size")
    began = time.perf_counter()
    loaded = load_model(
        model, dtype=config.dtype, allow_pickle=config.allow_pickle, budget=sizes[0]
    )
    if loaded.bitstack is None:
        raise MemtoolError(f"{model} is not a BitStack stack: --budgets needs one")
    for size in sizes:  # check every budget before measuring any
        loaded.bitstack.stack.blocks_for_budget(size)
    load_s = time.perf_counter() - began
    reports = []
    for size in sizes:
        mark = time.perf_counter()
        loaded.set_budget(size)
        resize_s = time.perf_counter() - mark
        report = measure(loaded, replace(config, budget=size))
        report.load_seconds, report.resize_seconds = load_s, resize_s
        reports.append(report)
    return reports


def kv_cache_bytes(model_config, tokens: int, element_bytes: int) -> int:
    """Bytes of keys and values for `tokens` positions (0 when the config does not say)."""
    layers = getattr(model_config, "num_hidden_layers", None)
    heads = getattr(model_config, "num_attention_heads", None)
    hidden = getattr(model_config, "hidden_size", None)
    if not (layers and heads and hidden):
        return 0
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or hidden // heads
    return 2 * layers * kv_heads * head_dim * tokens * element_bytes


def threshold_failures(
    report: MeasureReport,
    max_perplexity: float | None = None,
    max_weight_bytes: int | None = None,
    min_density: float | None = None,
) -> list[str]:
    """The CI gates that `report` breaks, one sentence each (empty when all pass)."""
    failures = []
    if min_density is not None:
        if report.capacity_density is None:
            raise MemtoolError("--min-density needs --density-profile (the reference to compare)")
        if report.capacity_density < min_density:
            failures.append(
                f"capacity density {report.capacity_density:.4g} is below --min-density "
                f"{min_density:g}"
            )
    if max_perplexity is not None and report.perplexity > max_perplexity:
        failures.append(
            f"perplexity {report.perplexity:.4g} exceeds --max-perplexity {max_perplexity:g}"
        )
    if max_weight_bytes is not None and report.weight_bytes > max_weight_bytes:
        failures.append(
            f"weight bytes {report.weight_bytes} exceed --max-weight-bytes {max_weight_bytes}"
        )
    return failures
