"""How much to swap and recompute: MEMO's swap fraction and the device-budget decision.

MEMO (Zhao et al., "Efficiently Training 7B LLM with 1 Million Sequence Length on 8 GPUs", arXiv
2407.12117) swaps a fraction alpha of every layer's token-proportional activations to host memory
and recomputes the rest, choosing alpha so the device-to-host copies hide behind the next layer's
compute and the host holds every layer's copies. `plan_swap_fraction` is that choice, with the
bandwidth and layer time measured on the first micro-batch instead of the paper's offline profile.

`plan_activations` adds the part MEMO leaves to the user: given a device budget for saved
activations and one measured micro-batch (`ActivationProfile`), it picks the cheapest mode that fits
(plain autograd, then recompute without swapping, then swapping) and refuses a budget below one
layer's working set, the least any mode can keep on the device during backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from memtool.errors import MemtoolError
from memtool.sizes import format_size


@dataclass(frozen=True)
class ActivationProfile:
    """Saved-activation bytes and timings of one micro-batch, measured with nothing recomputed.

    Attributes:
        layer_saved_bytes: per decoder layer, the bytes plain autograd keeps for its backward.
        layer_input_bytes: per decoder layer, the bytes of its input hidden states.
        layer_always_bytes: per layer, the part MEMO always swaps (layer input, attention output
            and softmax statistics); zeros outside "tokens" mode.
        outside_bytes: bytes saved outside the decoder layers (embedding, final norm, head, loss).
        layer_time_s: mean forward compute time of one layer.
        host_bandwidth_bytes_per_s: measured device-to-host copy rate; None when nothing was copied.
        layer_times_s: per decoder layer, its forward compute time; empty: every layer takes
            `layer_time_s`.
    """

    layer_saved_bytes: tuple[int, ...]
    layer_input_bytes: tuple[int, ...]
    layer_always_bytes: tuple[int, ...]
    outside_bytes: int
    layer_time_s: float
    host_bandwidth_bytes_per_s: float | None
    layer_times_s: tuple[float, ...] = ()

    @property
    def plain_bytes(self) -> int:
        """Saved-activation bytes of plain autograd: every layer plus what lies outside them."""
        return sum(self.layer_saved_bytes) + self.outside_bytes

    @property
    def minimum_bytes(self) -> int:
        """One layer's working set: the backward of the largest layer (or of the head and loss)
        needs all of its saved tensors on the device at once, whatever is swapped or recomputed."""
        return max(max(self.layer_saved_bytes, default=0), self.outside_bytes)


@dataclass(frozen=True)
class ActivationPlan:
    """What the manager does for the next micro-batches.

    Attributes:
        recompute: "none", "full" or "tokens".
        swap: whether saved tensors go to host memory.
        swap_fraction: alpha, the fraction of tokens swapped in "tokens" mode (the mean over
            layers when they differ); None otherwise.
        prefetch: restore layer i's tensors while layer i+1 runs backward (applied on CUDA).
        layer_fractions: per decoder layer alpha, when planned per layer; empty: every layer
            uses `swap_fraction`.
    """

    recompute: str
    swap: bool
    swap_fraction: float | None = None
    prefetch: bool = False
    layer_fractions: tuple[float, ...] = ()

    def fraction(self, layer: int) -> float | None:
        """Layer `layer`'s alpha."""
        return self.layer_fractions[layer] if self.layer_fractions else self.swap_fraction

    @property
    def mode(self) -> str:
        """A short name for logs and stats: plain, swap, full, full+swap, tokens, tokens+swap."""
        if self.recompute == "none":
            return "swap" if self.swap else "plain"
        return f"{self.recompute}+swap" if self.swap else self.recompute


def plan_swap_fraction(
    layer_time_s: float,
    host_bandwidth_bytes_per_s: float,
    swappable_bytes_per_layer: int,
    always_swapped_bytes_per_layer: int,
    n_layers: int,
    host_budget_bytes: int | None,
) -> float:
    """MEMO's swap fraction: the largest alpha whose copies hide behind compute and fit the host.

    Layer i's copies (`A + alpha·W` bytes, A always swapped, W swappable) run while layer i+1
    computes, so they hide when `(A + alpha·W) / bandwidth ≤ layer_time`; the host keeps every
    layer's copies until backward, so `n_layers · (A + alpha·W) ≤ host_budget`. Hence

        alpha = clamp(min((layer_time·bandwidth - A) / W, (host_budget / n_layers - A) / W), 0, 1)

    When even alpha = 0 cannot hide the always-swapped part, alpha = 0: that part is still swapped
    (it is the price of recomputing everything else) and the step waits for it.

    Args:
        layer_time_s: forward compute time of one layer.
        host_bandwidth_bytes_per_s: device-to-host copy rate.
        swappable_bytes_per_layer: W, the token-proportional activations that are swapped or
            recomputed.
        always_swapped_bytes_per_layer: A, the layer input, attention output and statistics.
        n_layers: decoder layers whose copies the host holds at once.
        host_budget_bytes: host memory for swapped activations; None for no limit.

    Returns:
        alpha in [0, 1].

    Raises:
        MemtoolError: a non-positive time, bandwidth or layer count, or a host budget that cannot
            hold even the always-swapped part of every layer.
    """
    if layer_time_s <= 0 or host_bandwidth_bytes_per_s <= 0 or n_layers <= 0:
        raise MemtoolError(
            "plan_swap_fraction needs a positive layer time, host bandwidth and layer count"
        )
    always_total = n_layers * always_swapped_bytes_per_layer
    if host_budget_bytes is not None and always_total > host_budget_bytes:
        raise MemtoolError(
            f"host memory for swapped activations ({format_size(host_budget_bytes)}) cannot hold "
            "the layer inputs and attention outputs MEMO always swaps "
            f"({format_size(always_total)}); shorten the sequence or use --recompute full"
        )
    if swappable_bytes_per_layer <= 0:
        return 1.0
    alpha = (layer_time_s * host_bandwidth_bytes_per_s - always_swapped_bytes_per_layer) / (
        swappable_bytes_per_layer
    )
    if host_budget_bytes is not None:
        host_alpha = (host_budget_bytes / n_layers - always_swapped_bytes_per_layer) / (
            swappable_bytes_per_layer
        )
        alpha = min(alpha, host_alpha)
    return min(max(alpha, 0.0), 1.0)


def plan_layer_fractions(
    layer_times_s: tuple[float, ...],
    host_bandwidth_bytes_per_s: float,
    swappable_bytes: tuple[int, ...],
    always_swapped_bytes: tuple[int, ...],
    host_budget_bytes: int | None,
) -> tuple[float, ...]:
    """MEMO's alpha for each layer: layer i's copies hide behind layer i+1's compute.

    Per layer, `alpha_i = clamp((t_{i+1}·bandwidth - A_i) / W_i, 0, 1)` (the last layer's copies
    run behind the head and loss, taken as long as the last layer). If the host cannot hold
    every layer's `A_i + alpha_i·W_i`, the largest alphas come down first to a common cap,
    the most host bytes for the least extra recomputation per layer.

    Raises:
        MemtoolError: as `plan_swap_fraction` (bad measurements, or a host budget below the
            always-swapped bytes).
    """
    n = len(layer_times_s)
    fractions = []
    for i in range(n):
        overlap = layer_times_s[min(i + 1, n - 1)]
        bandwidth, w, a = host_bandwidth_bytes_per_s, swappable_bytes[i], always_swapped_bytes[i]
        fractions.append(plan_swap_fraction(overlap, bandwidth, w, a, n, None))
    if host_budget_bytes is None:
        return tuple(fractions)
    always_total = sum(always_swapped_bytes)
    if always_total > host_budget_bytes:
        plan_swap_fraction(1.0, 1.0, 1, always_total, 1, host_budget_bytes)  # raises the message

    def host_bytes(cap: float) -> float:
        pairs = zip(fractions, swappable_bytes, strict=True)
        return always_total + sum(min(a, cap) * w for a, w in pairs)

    if host_bytes(1.0) <= host_budget_bytes:
        return tuple(fractions)
    low, high = 0.0, 1.0  # bisect the common cap on the largest alphas
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if host_bytes(middle) <= host_budget_bytes else (low, middle)
    return tuple(min(a, low) for a in fractions)


def plan_activations(
    profile: ActivationProfile,
    recompute: str,
    swap: bool,
    swap_fraction: float | None,
    budget_bytes: int | None,
    host_budget_bytes: int | None,
) -> ActivationPlan:
    """Choose the mode for the next micro-batches from one measured micro-batch.

    Without a budget the configured mode runs as given and only alpha is planned when unset. With
    a budget the cheapest mode that fits wins: plain autograd; then, for "full" or "none",
    recomputation with layer inputs kept on the device (for "tokens" without swapping: the layer
    inputs and attention outputs); then the configured recomputation with swapping, if `swap`
    allows it. Prefetching a
    second layer in backward is allowed when the budget holds two working sets.

    Raises:
        MemtoolError: the budget is below one layer's working set (naming it), or nothing fits
            without the swapping `swap=False` forbids.
    """
    minimum = profile.minimum_bytes
    if budget_bytes is not None:
        if budget_bytes < minimum:
            raise MemtoolError(
                f"activation budget {format_size(budget_bytes)} is below the minimum "
                f"{format_size(minimum)} (one layer's saved activations, needed on the device in "
                "backward even with full recomputation and swapping); raise the budget or "
                "shorten the sequence"
            )
        if profile.plain_bytes <= budget_bytes:
            return ActivationPlan("none", False)
        kept_by_full = sum(profile.layer_input_bytes) + profile.outside_bytes
        kept_by_tokens = sum(profile.layer_always_bytes) + profile.outside_bytes
        # "none" under a budget leaves the choice to the plan: recomputing whole layers comes
        # before swapping (cheaper than copies on a GPU: 1.3x against 2.1x on an H200).
        if recompute in ("full", "none") and kept_by_full <= budget_bytes:
            return ActivationPlan("full", False)
        if recompute == "tokens" and not swap and kept_by_tokens <= budget_bytes:
            return ActivationPlan("tokens", False, 0.0)
        if not swap:
            raise MemtoolError(
                f"activations need {format_size(profile.plain_bytes)} without swapping, over the "
                f"budget {format_size(budget_bytes)}; enable swapping (--swap-activations)"
            )
    prefetch = swap and (budget_bytes is None or budget_bytes >= 2 * minimum)
    if recompute != "tokens":
        return ActivationPlan(recompute, swap, prefetch=prefetch)
    if not swap:
        return ActivationPlan("tokens", False, 0.0)
    if swap_fraction is not None:
        return ActivationPlan("tokens", True, swap_fraction, prefetch)
    fractions = _measured_fractions(profile, host_budget_bytes)
    mean = sum(fractions) / len(fractions) if fractions else 1.0
    return ActivationPlan("tokens", True, mean, prefetch, fractions)


def _measured_fractions(
    profile: ActivationProfile, host_budget_bytes: int | None
) -> tuple[float, ...]:
    n = len(profile.layer_saved_bytes)
    if profile.host_bandwidth_bytes_per_s is None or profile.layer_time_s <= 0:
        return (1.0,) * n
    times = profile.layer_times_s or (profile.layer_time_s,) * n
    # A layer measured at zero (clock resolution) borrows the mean rather than swapping nothing.
    times = tuple(t if t > 0 else profile.layer_time_s for t in times)
    pairs = zip(profile.layer_saved_bytes, profile.layer_always_bytes, strict=True)
    swappable = tuple(max(saved - kept, 0) for saved, kept in pairs)
    # What lies outside the layers (head, loss) is swapped too and takes host memory first.
    if host_budget_bytes is not None:
        host_budget_bytes = max(host_budget_bytes - profile.outside_bytes, 0)
    fractions = plan_layer_fractions(
        times,
        profile.host_bandwidth_bytes_per_s,
        swappable,
        profile.layer_always_bytes,
        host_budget_bytes,
    )
    # Round down to a multiple of 1/1024 so that repeated plans on similar measurements give the
    # same token split instead of jittering by a token.
    return tuple(math.floor(a * 1024) / 1024 for a in fractions)


def unhidden_copy_seconds(profile: ActivationProfile, plan: ActivationPlan) -> float:
    """Seconds per micro-batch that the plan's device-to-host copies cannot hide behind compute:
    per layer, what its copies (`A + alpha·W` bytes in "tokens" mode, every saved byte otherwise)
    take beyond the next layer's forward time. 0 without swapping or a bandwidth measurement."""
    bandwidth = profile.host_bandwidth_bytes_per_s
    if not plan.swap or not bandwidth:
        return 0.0
    n = len(profile.layer_saved_bytes)
    times = profile.layer_times_s or (profile.layer_time_s,) * n
    total = 0.0
    for i in range(n):
        saved, always = profile.layer_saved_bytes[i], profile.layer_always_bytes[i]
        if plan.recompute == "tokens":
            copied = always + (plan.fraction(i) or 0.0) * max(saved - always, 0)
        elif plan.recompute == "full":
            copied = profile.layer_input_bytes[i]
        else:
            copied = saved
        total += max(copied / bandwidth - times[min(i + 1, n - 1)], 0.0)
    return total


def swap_warning(profile: ActivationProfile, plan: ActivationPlan) -> str | None:
    """A one-line warning when the plan's copies would make the forward pass wait longer than
    half its compute (measured on an H200: MEMO at 2.2x the plain step, where full recomputation
    cost 1.3x for as little resident memory); None when they hide well enough."""
    wait_s = unhidden_copy_seconds(profile, plan)
    n = len(profile.layer_saved_bytes)
    compute_s = sum(profile.layer_times_s) if profile.layer_times_s else profile.layer_time_s * n
    if wait_s <= 0.5 * compute_s or compute_s <= 0:
        return None
    kept = format_size(sum(profile.layer_input_bytes) + profile.outside_bytes)
    return (
        f"activation swapping cannot hide behind compute here: each micro-batch would wait "
        f"about {wait_s * 1e3:.1f} ms for copies on top of {compute_s * 1e3:.1f} ms of layer "
        f"compute (host copies at {profile.host_bandwidth_bytes_per_s / 1e9:.1f} GB/s); "
        f"--recompute full without swapping keeps {kept} and copies nothing"
    )
