"""Perplexity under the GPTQ-lineage protocol.

The protocol (GPTQ, AWQ, BitStack and most quantization papers report it this way): the whole
evaluation text is tokenized once without BOS, cut into non-overlapping windows of `seq_len`
tokens, each window is scored independently (tokens 2..seq_len are predicted), and perplexity is
exp of the mean negative log-likelihood over all predicted tokens. Numbers are comparable only at
equal data, split, seq_len and tokenizer, so results carry all four.
"""

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memtool.progress import step_progress

PROTOCOL = (
    "GPTQ-lineage: whole text tokenized without BOS, non-overlapping windows of seq_len tokens, "
    "each scored independently; perplexity = exp(mean NLL over tokens 2..seq_len of every window)"
)


@dataclass
class PerplexityResult:
    perplexity: float
    nll_mean: float
    predicted_tokens: int
    fed_tokens: int  # tokens through the model: windows * seq_len
    windows: int
    forward_seconds: float
    # Summed NLL of each forward batch (one window per batch at batch_size 1): what the
    # density's bootstrap resamples. Their sum is the total behind nll_mean.
    batch_nll_sums: tuple[float, ...] = ()
    batch_predicted_tokens: tuple[int, ...] = ()

    @property
    def tokens_per_s(self) -> float:
        """Tokens fed through the model per second of forward (and loss) time."""
        return self.fed_tokens / self.forward_seconds if self.forward_seconds > 0 else 0.0


def window_nll_sum(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Summed NLL (float64) of tokens 2..L of each row of `batch` [B, L]."""
    logits = model(input_ids=batch, use_cache=False).logits
    shift_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1]).float()
    labels = batch[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits, labels, reduction="sum").double()


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    batch_size: int = 1,
    show_progress: bool = True,
) -> PerplexityResult:
    """Perplexity of `model` on `input_ids` [n_windows, seq_len] (see the module docstring).

    Args:
        model: a causal LM returning `.logits`.
        input_ids: int64 windows, already cut by the protocol.
        batch_size: windows per forward call.
        show_progress: draw a progress bar on stderr.
    """
    n_windows, seq_len = input_ids.shape
    device = next(model.parameters()).device
    total_nll = torch.zeros((), dtype=torch.float64)
    forward_s = 0.0
    batch_sums: list[float] = []
    batch_tokens: list[int] = []
    with step_progress() as progress:
        task = progress.add_task("Perplexity", total=n_windows, status="", visible=show_progress)
        for start in range(0, n_windows, batch_size):
            batch = input_ids[start : start + batch_size].to(device)
            began = time.perf_counter()
            batch_nll = window_nll_sum(model, batch).cpu()
            total_nll += batch_nll
            forward_s += time.perf_counter() - began
            batch_sums.append(batch_nll.item())
            batch_tokens.append(batch.shape[0] * (seq_len - 1))
            done = min(start + batch_size, n_windows)
            running = math.exp(total_nll.item() / (done * (seq_len - 1)))
            progress.update(task, completed=done, status=f"ppl {running:.3f}")
    predicted = n_windows * (seq_len - 1)
    nll_mean = total_nll.item() / predicted
    return PerplexityResult(
        perplexity=math.exp(nll_mean),
        nll_mean=nll_mean,
        predicted_tokens=predicted,
        fed_tokens=n_windows * seq_len,
        windows=n_windows,
        forward_seconds=forward_s,
        batch_nll_sums=tuple(batch_sums),
        batch_predicted_tokens=tuple(batch_tokens),
    )
