"""Compression configs: one dataclass per method, validated in one place."""

import math
from dataclasses import dataclass

from memtool.compress.precision import check_compute_dtype
from memtool.compress.quantizer import check_bits
from memtool.data import TokenWindows, calibration_windows, parse_data_spec
from memtool.errors import MemtoolError


@dataclass(frozen=True)
class RTNConfig:
    """Round-to-nearest: no calibration; the baseline every calibrated method must beat."""

    bits: int = 4
    group_size: int = 128  # -1: one group per output row ("per channel")
    sym: bool = True

    method = "rtn"

    def validate(self) -> None:
        check_bits(self.bits)
        if self.group_size != -1 and self.group_size <= 0:
            raise MemtoolError(f"--group-size {self.group_size} must be positive or -1")


@dataclass(frozen=True)
class GPTQConfig(RTNConfig):
    """GPTQ (Frantar et al., 2023); see `memtool.compress.gptq`."""

    # On by default: measured on smollm2-135m at 4 bits g128, wiki ppl 21.6 vs 25.6 without
    # (RTN 26.0), and static groups make it free at inference.
    act_order: bool = True
    # False: act-order groups fitted in act order, on the weights as updated so far (shuffled
    # g_idx, GPTQModel's desc_act default); `GPTQLinear` holds such rows sorted by group at
    # load, so decoding runs the same kernel at the same speed. True: fitted up front on the
    # original column order (g_idx = i // group_size, no reordering at all at inference).
    # Measured on smollm2-135m, 4 bits g128 sym, 128 x 512 wiki: wiki perplexity 18.46
    # dynamic vs 19.03 static (GPTQModel 7.7, same windows: 18.48).
    static_groups: bool = False
    # Each group of a layer's linears calibrated through the groups quantized before it
    # (GPTQModel's default). None (the default): on at 3 bits and below, off above. Measured on
    # smollm2-135m, g128 sym act-order, 128 x 512 wiki: at 4 bits it changed wiki perplexity
    # by +0.1% and took 45-95% longer; at 3 bits it took wiki perplexity 43.39 -> 41.68
    # (GPTQModel 7.7, same windows: 42.50).
    true_sequential: bool | None = None
    damp_percent: float = 0.01
    block_size: int = 128
    # Matmul dtype of the calibration forwards (`memtool.compress.precision`): "auto" is
    # bfloat16 where the hardware has it natively, with the hidden states kept in it between
    # layers; Hessians and the quantization stay float32. `compress` records the dtype used.
    stats_dtype: str = "auto"

    method = "gptq"

    def __post_init__(self) -> None:
        if self.true_sequential is None:
            # Frozen: the resolved choice is what the output's metadata records.
            object.__setattr__(self, "true_sequential", self.bits <= 3)

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.true_sequential, bool):
            raise MemtoolError(
                f"true_sequential must be true or false, got {self.true_sequential!r}"
            )
        if not 0 < self.damp_percent <= 1:
            raise MemtoolError(f"--damp-percent {self.damp_percent} must be in (0, 1]")
        if self.block_size <= 0:
            raise MemtoolError(f"--block-size {self.block_size} must be positive")
        check_compute_dtype("--stats-dtype", self.stats_dtype)


@dataclass(frozen=True)
class AWQConfig:
    """AWQ (Lin et al., MLSys 2024); see `memtool.compress.awq`.

    Not a subclass of `RTNConfig`, although it shares bits/group_size/sym: code that asks
    `isinstance(config, RTNConfig)` means "needs no calibration", which AWQ does.
    """

    bits: int = 4
    group_size: int = 128  # -1: one group per output row ("per channel")
    sym: bool = False  # AWQ's default is zero_point=True, i.e. asymmetric groups
    n_grid: int = 20  # grid points for the scale exponent alpha and the clip ratio
    duo_scaling: bool = False  # AutoAWQ's default; the paper and llm-awq use s_x^alpha alone
    clip: bool = True
    max_shrink: float = 0.5  # clip search tries max|w| * (1 - r) for r < max_shrink
    clip_tokens: int = 512  # calibration tokens (evenly strided) the clip search uses
    checkpoint_format: str = "auto"  # "gemm" (AWQ, 4-bit), "gptq" (any bits), "auto"
    fallback_rtn: bool = False  # unsupported architecture: round-to-nearest instead of an error
    # Matmul dtype of the calibration forwards, the scale search's included (as GPTQConfig's;
    # AutoAWQ searches in float16 on GPU). The clip search and the rounding stay float32.
    stats_dtype: str = "auto"

    method = "awq"

    def validate(self) -> None:
        check_bits(self.bits)
        if self.group_size != -1 and self.group_size <= 0:
            raise MemtoolError(f"--group-size {self.group_size} must be positive or -1")
        if self.n_grid <= 0:
            raise MemtoolError(f"n_grid {self.n_grid} must be positive")
        if not 0 <= self.max_shrink < 1:
            raise MemtoolError(f"max_shrink {self.max_shrink} must be in [0, 1)")
        if self.clip_tokens <= 0:
            raise MemtoolError(f"clip_tokens {self.clip_tokens} must be positive")
        if self.checkpoint_format not in ("auto", "gemm", "gptq"):
            raise MemtoolError(
                f"checkpoint_format {self.checkpoint_format!r} must be auto, gemm or gptq"
            )
        check_compute_dtype("--stats-dtype", self.stats_dtype)


@dataclass(frozen=True)
class CalibrationConfig:
    """Which calibration windows a calibrated method sees."""

    data: str = "wiki"
    n_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    batch_size: int = 8

    def validate(self) -> None:
        for name in ("n_samples", "seq_len", "batch_size"):
            value = getattr(self, name)
            if value <= 0:
                flag = {"n_samples": "--calib-samples"}.get(name, "--" + name.replace("_", "-"))
                raise MemtoolError(f"{flag} must be a positive number, got {value}")

    def windows(
        self, tokenizer, data: str | None = None, n_samples: int | None = None
    ) -> TokenWindows:
        """The calibration windows (`memtool.data.calibration_windows`): of `data` and
        `n_samples` when given (say, BitStack's score windows), with this seq_len and seed."""
        return calibration_windows(
            self.data if data is None else data,
            tokenizer,
            n_samples=self.n_samples if n_samples is None else n_samples,
            seq_len=self.seq_len,
            seed=self.seed,
        )


DEFAULT_SCORE_SAMPLES = 16


@dataclass(frozen=True)
class BitStackConfig:
    """BitStack any-size decomposition; see `memtool.compress.bitstack`.

    With `rank=None` each linear gets the rank whose residual block costs about `block_bits`
    bits per weight (1 for the signs, the rest for the fp16 factors): on smollm2-135m that is
    rank 4 for q/o (576x576), 2 for k/v (192x576) and 7 for gate/up/down (576x1536). A fixed
    rank costs more per weight on narrow matrices: the official K=16 suits 4096-wide models.
    """

    niter: int = 16  # residual blocks per linear
    rank: int | None = None  # None: per shape, from block_bits
    block_bits: float = 1.25
    order: str = "importance"  # or "uniform" (level by level)
    # Correct each linear's importance estimate by how its output gradients and inputs
    # correlate across tokens (`token_correlation`; K-FAC assumes they do not). Off by default:
    # on smollm2-135m with wiki calibration it lowers wiki perplexity (by 1-19% at 88-151 MB)
    # but raises code's (by 4-21% at 104-120 MB); with `mixed` calibration it gives the only
    # stack measured below per-channel 4-bit RTN on both texts (BENCHMARKS.md).
    token_weighting: bool = False
    # Fit each block's magnitudes with every output row weighted by its importance to the loss,
    # `sqrt(fisher)` raised to this power (0: all rows alike, as the paper): on smollm2-135m
    # with wiki calibration, power 1 lowered wiki perplexity at 88-182 MB by 1-12% and code's
    # by 1-28% (BENCHMARKS.md). Needs the score windows' output gradients.
    output_weighting: float = 1.0
    scale: bool = True  # activation-aware input scaling
    residual: str = "fp16"  # subtract the stored fp16 factors ("fp32": the unrounded ones)
    exact_svd: bool = False
    # Choose each block's signs with GPTQ-style error feedback through the inverse input
    # Hessian (from the score windows), minimising output rather than weight error.
    feedback: bool = True
    # The feedback Hessian's dampening, a fraction of its mean diagonal. Far above GPTQ's 0.01:
    # on smollm2-135m 0.01 halves wiki perplexity at 104 MB but more than doubles code's (the
    # calibration domain is overfitted); 0.3 keeps most of the gain on wiki and costs code
    # little (BENCHMARKS.md).
    damp_percent: float = 0.3
    # Calibration windows back-propagated for the importance estimate; their input Hessians
    # also drive the feedback. None: DEFAULT_SCORE_SAMPLES, or every calibration window when
    # there are fewer (16 rather than 8: wiki perplexity 31.8 -> 30.1 at 110 MB).
    score_samples: int | None = None
    # Data spec the score windows are drawn from (None: the first `score_samples` calibration
    # windows). The scales want broad data, the feedback the text the model must serve best:
    # on smollm2-135m at 110 MB, scales from `mixed` with wiki score windows gave wiki / code
    # perplexity 29.9 / 33.2, against 30.1 / 41.4 all from wiki (BENCHMARKS.md).
    score_data: str | None = None
    # The statistics pass's matmuls: "auto" runs them in bfloat16 where the hardware does so
    # natively (CUDA, or a CPU with AVX512-BF16/AMX), as the official code's half-precision
    # model does; "float32" everywhere else. Sums and norms stay float32 either way.
    stats_dtype: str = "auto"
    seed: int = 0

    method = "bitstack"

    def validate(self) -> None:
        if self.niter < 1:
            raise MemtoolError(f"--niter {self.niter} must be at least 1")
        if self.rank is not None and self.rank < 1:
            raise MemtoolError(f"--rank {self.rank} must be at least 1")
        if not 1 < self.block_bits <= 16:
            raise MemtoolError(f"block_bits {self.block_bits} must be in (1, 16]")
        if self.order not in ("importance", "uniform"):
            raise MemtoolError(f"--order {self.order!r} must be importance or uniform")
        if self.residual not in ("fp16", "fp32"):
            raise MemtoolError(f"residual {self.residual!r} must be fp16 or fp32")
        if self.score_samples is not None and self.score_samples < 0:
            raise MemtoolError(f"--score-samples {self.score_samples} must be 0 or more")
        if self.score_data is not None:
            if self.score_samples == 0:
                raise MemtoolError("--score-calib needs score windows: drop --score-samples 0")
            parse_data_spec(self.score_data)  # a bad spec fails before any work
        if self.feedback and self.score_samples == 0:
            raise MemtoolError(
                "--feedback needs the input Hessians of the score windows: set --score-samples "
                "to 1 or more, or pass --no-feedback"
            )
        if not self.output_weighting >= 0 or math.isinf(self.output_weighting):  # NaN too
            raise MemtoolError(
                f"--output-weighting {self.output_weighting} must be a finite number, 0 or more"
            )
        if self.output_weighting > 0 and self.score_samples == 0:
            raise MemtoolError(
                "--output-weighting needs the output gradients of the score windows: set "
                "--score-samples to 1 or more, or pass --output-weighting 0"
            )
        if not 0 < self.damp_percent <= 1:
            raise MemtoolError(f"--damp-percent {self.damp_percent} must be in (0, 1]")
        check_compute_dtype("--stats-dtype", self.stats_dtype)
