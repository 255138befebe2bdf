"""`measure`: perplexity, sizes, bits per weight, memory and speed of one model.

The library call behind `memtool measure`. Everything is computed on CPU in float32 unless the
config says otherwise; the report names the data, split, window count and protocol it used so
two numbers are only compared when they were measured the same way.
"""

import time
from dataclasses import asdict, dataclass, field

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
from memtool.models import LoadedModel, load_model

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
    """

    data: str = "wiki"
    seq_len: int = 512
    max_windows: int | None = DEFAULT_MAX_WINDOWS
    dtype: str = "float32"
    batch_size: int = 1
    allow_pickle: bool = False
    show_progress: bool = True

    def validate(self) -> None:
        for name in ("seq_len", "batch_size", "max_windows"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                flag = "--" + name.replace("_", "-")
                raise MemtoolError(f"{flag} must be a positive number, got {value}")
        if self.seq_len < 2:
            raise MemtoolError("--seq-len must be at least 2 (one token predicts the next)")


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
    memtool_version: str = __version__
    conventions: dict = field(
        default_factory=lambda: {
            "params_non_embedding": "excludes nn.Embedding tables and the output head",
            "weight_bytes": "parameters + persistent buffers in memory, tied tensors once",
            "bits_per_weight": "8 * weight_bytes / params_total",
            "bits_per_weight_linear": "storage bits / weights of the body's linear layers",
            "peak_rss_bytes": "peak resident memory of the process, loading included",
            "tokens_per_s": "eval_tokens / forward_seconds",
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
    began = time.perf_counter()
    loaded = (
        model
        if isinstance(model, LoadedModel)
        else load_model(model, dtype=config.dtype, allow_pickle=config.allow_pickle)
    )
    load_s = time.perf_counter() - began
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
    dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    return MeasureReport(
        model=loaded.source,
        model_kind=loaded.kind,
        dtype=dtype,
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
    )


def threshold_failures(
    report: MeasureReport,
    max_perplexity: float | None = None,
    max_weight_bytes: int | None = None,
) -> list[str]:
    """The CI gates that `report` breaks, one sentence each (empty when all pass)."""
    failures = []
    if max_perplexity is not None and report.perplexity > max_perplexity:
        failures.append(
            f"perplexity {report.perplexity:.4g} exceeds --max-perplexity {max_perplexity:g}"
        )
    if max_weight_bytes is not None and report.weight_bytes > max_weight_bytes:
        failures.append(
            f"weight bytes {report.weight_bytes} exceed --max-weight-bytes {max_weight_bytes}"
        )
    return failures
