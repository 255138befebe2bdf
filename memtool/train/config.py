"""What a training run is: one dataclass, validated before any model or process group exists."""

import math
from dataclasses import asdict, dataclass, field

from memtool.errors import MemtoolError

ZERO_STAGES = (0, 1, 2, 3)
COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclass
class OptimConfig:
    """AdamW with decoupled weight decay, a linear warmup and global-norm clipping."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0

    def validate(self) -> None:
        """Raise a one-line `MemtoolError` naming the first bad setting."""
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise MemtoolError(f"--lr must be a positive number, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise MemtoolError(f"--weight-decay must be 0 or more, got {self.weight_decay}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise MemtoolError(f"eps must be a positive number, got {self.eps}")
        if not all(0 <= beta < 1 for beta in self.betas):
            raise MemtoolError(f"betas must lie in [0, 1), got {self.betas}")
        if self.warmup_steps < 0:
            raise MemtoolError(f"--warmup-steps must be 0 or more, got {self.warmup_steps}")
        norm = self.max_grad_norm
        if norm is not None and not (math.isfinite(norm) and norm > 0):
            raise MemtoolError(
                f"--max-grad-norm must be a positive number (0 turns clipping off), got {norm}"
            )

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step `step` (1-based): linear warmup, then constant."""
        if self.warmup_steps and step <= self.warmup_steps:
            return self.lr * step / self.warmup_steps
        return self.lr


@dataclass
class TrainConfig:
    """One training run.

    Batch sizes are global, so one process and many see the same sequences per optimizer step
    (and, for a fixed seed, give the same loss curve): every step consumes `batch_size`
    sequences of `seq_len` tokens, split over `grad_accum` micro-batches on each of the ranks.

    Attributes:
        data: Data spec of the training text (`wiki`, `code`, `mixed`, a file, ...); its
            calibration (training) split is used.
        steps: Optimizer steps to run (a resumed run counts the steps already done).
        batch_size: Sequences per optimizer step, all ranks and micro-batches together.
        seq_len: Tokens per sequence.
        grad_accum: Micro-batches per optimizer step on each rank.
        zero: 0 data parallel; 1 optimizer states sharded; 2 + gradients sharded; 3 + parameters
            sharded (PyTorch FSDP2).
        offload_optimizer: fp32 master weights and Adam moments live in host memory and are
            stepped there (ZeRO-Offload); the compute device keeps only compute weights and
            gradients.
        compute_dtype: dtype of the weights the forward pass runs in; with `bfloat16` the
            optimizer keeps fp32 master weights.
        optimizer_bits: 32 (torch's fused AdamW) or 8 (bitsandbytes' AdamW8bit: block-wise 8-bit
            moments; stages 0-2).
        seed: Seeds the fresh model (`--from-config`), the data order and every rank's RNG.
        save_every: Write a resumable checkpoint every this many steps (None: only at the end and
            on interrupt).
    """

    data: str = "wiki"
    steps: int = 100
    batch_size: int = 8
    seq_len: int = 512
    grad_accum: int = 1
    zero: int = 0
    offload_optimizer: bool = False
    compute_dtype: str = "float32"
    optimizer_bits: int = 32
    seed: int = 0
    save_every: int | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self, world_size: int = 1) -> None:
        """Raise a one-line `MemtoolError` naming the first bad setting and what to do."""
        if self.zero not in ZERO_STAGES:
            raise MemtoolError(f"unknown --zero {self.zero}: use 0, 1, 2 or 3")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise MemtoolError(
                f"unknown compute dtype {self.compute_dtype!r}: use {' or '.join(COMPUTE_DTYPES)}"
            )
        if self.optimizer_bits not in (8, 32):
            raise MemtoolError(f"--optimizer-bits must be 32 or 8, got {self.optimizer_bits}")
        if self.optimizer_bits == 8 and self.zero == 3:
            raise MemtoolError(
                "8-bit optimizer states apply to --zero 0, 1 or 2 (bitsandbytes does not step "
                "FSDP2's sharded DTensors); use one of those or 32-bit states"
            )
        for name in ("steps", "batch_size", "seq_len", "grad_accum"):
            if getattr(self, name) <= 0:
                raise MemtoolError(f"--{name.replace('_', '-')} must be positive")
        if self.seq_len < 2:
            raise MemtoolError(
                "--seq-len must be at least 2: a one-token sequence has no next token to predict"
            )
        if self.save_every is not None and self.save_every <= 0:
            raise MemtoolError("--save-every must be positive")
        self.optim.validate()
        per_step = world_size * self.grad_accum
        if self.batch_size % per_step:
            raise MemtoolError(
                f"--batch-size {self.batch_size} does not split into {self.grad_accum} "
                f"micro-batch(es) on each of {world_size} rank(s); use a multiple of {per_step}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        values = dict(values)
        optim = values.pop("optim", {})
        optim["betas"] = tuple(optim.get("betas", (0.9, 0.999)))
        return cls(**values, optim=OptimConfig(**optim))
