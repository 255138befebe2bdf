"""Which FFN neurons a token needs: calibrated thresholds and low-rank predictors.

ReLU FFNs (OPT) are sparse by nature: a neuron whose pre-activation is negative contributes
nothing. SwiGLU FFNs (Llama, the default model) are not, so memtool makes them sparse the CATS
way (Lee et al. 2024, "CATS: Contextually-Aware Thresholding for Sparsity"): per layer, a
threshold on |act(gate)| below which a neuron is dropped, calibrated so that a chosen fraction
(the sparsity level) of calibration activations fall below it.

Knowing which neurons pass needs the gate (or fc1) row of every neuron, which is what streaming
means not to hold. "LLM in a flash" keeps a small predictor resident instead. memtool has two:

- `quant:BITS` (default for SwiGLU, 4 bits): the gate/fc1 weight quantized round-to-nearest
  in groups of 64 and run with memtool's GPTQ-layout kernels (`memtool.ops.gptq_linear`):
  an approximation of the very pre-activations the threshold is taken on. Measured on the
  default model at level 0.8 and 95% recall it loads 20-24% of the neurons (20% truly pass),
  where the low-rank predictor below at rank 72 loads 79-88% and a trained two-layer predictor
  of the same size 50-73% (layers 2, 15, 28; development notes in BENCHMARKS.md).
- `lowrank:RANK` (default for ReLU, rank hidden/16, as the paper's OPT predictors): the
  rank-r least-squares fit of the pre-activations over calibration inputs X,
  min ||X Wᵀ - X A B||: with XᵀX = N RᵀR (Cholesky), A B = R⁻¹ [R Wᵀ]_r where [.]_r is the
  truncated SVD.

Each predictor is fitted on one half of the calibration tokens; on the other half each layer's
predictor threshold is set so that it keeps `recall` of the neurons that truly pass. At run time
a neuron is loaded when the predictor says so, and its exact activation is then still
thresholded (SwiGLU) or ReLU'd, so the result equals the dense FFN with that neuron mask
applied (`memtool.serve.flash.reference`).
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from memtool.compress.quantizer import rtn_quantize
from memtool.errors import MemtoolError
from memtool.formats.checksums import file_crc32
from memtool.formats.gptq_pack import pack_gptq
from memtool.models.layers import decoder_layers
from memtool.ops import gptq_linear
from memtool.progress import counted_steps

PREDICTOR_FILE = "predictors.safetensors"
PREDICTOR_META = "predictors.json"
LEVELS = (0.5, 0.6, 0.7, 0.8, 0.9)  # SwiGLU sparsity levels calibrated into every store
DEFAULT_RECALL = 0.95
PREDICTOR_GROUP = 64  # columns per quantization group of a `quant` predictor


def default_predictor(kind: str, hidden: int) -> str:
    """`quant:4` for SwiGLU (its threshold needs accurate magnitudes), `lowrank:hidden/16`
    for ReLU (a sign test, which low rank predicts well enough, as in the paper)."""
    if kind == "swiglu" and hidden % 32 == 0:
        return "quant:4"
    return f"lowrank:{max(8, hidden // 16)}"


def parse_predictor(spec: str) -> tuple[str, int]:
    """ "quant:BITS" (2, 3, 4 or 8) or "lowrank:RANK" -> (kind, number)."""
    kind, _, number = spec.partition(":")
    try:
        value = int(number)
    except ValueError:
        value = -1
    if kind == "quant" and value in (2, 3, 4, 8):
        return kind, value
    if kind == "lowrank" and value > 0:
        return kind, value
    raise MemtoolError(f"predictor {spec!r}: use quant:BITS (2, 3, 4, 8) or lowrank:RANK")


@dataclass
class LayerSelector:
    """Neuron selection for one layer. `mode`: "dense", "predictor" or "cats" (exact, from a
    resident gate). Thresholds are None where the mode does not use them."""

    mode: str
    kind: str  # "swiglu" | "relu"
    act: nn.Module
    n_neurons: int
    a: Tensor | None = None  # lowrank: [H, r]
    b: Tensor | None = None  # lowrank: [r, I]
    packed: dict[str, Tensor] | None = None  # quant: qweight, qzeros, scales, g_idx
    bits: int = 0
    bias: Tensor | None = None  # [I]: ReLU's fc1 bias, which the predictor adds
    predict_threshold: float | None = None
    cats_threshold: float | None = None  # SwiGLU: |act(gate)| at or below it is dropped
    gate: Tensor | None = None  # [I, H] resident gate (SwiGLU) or fc1 (ReLU) for "cats"

    def mask(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(neurons to load per token [T, I] bool, the exact gate [T, I] when computed)."""
        if self.mode == "dense":
            return torch.ones(x.shape[0], self.n_neurons, dtype=torch.bool), None
        if self.mode == "cats":  # the resident gate (SwiGLU) or fc1 (ReLU): exact selection
            bias = self.bias.to(x.dtype) if self.bias is not None else None
            gate = nn.functional.linear(x, self.gate.to(x.dtype), bias)
            if self.kind == "relu":
                return gate > 0, gate
            return self.act(gate).abs() > self.cats_threshold, gate
        if self.packed is not None:
            scores = gptq_linear(x, **self.packed, bits=self.bits, in_features=x.shape[-1])
        else:  # the factors keep the store's dtype; a float32 reference model casts to them
            scores = ((x.to(self.a.dtype) @ self.a) @ self.b).to(x.dtype)
        if self.kind == "relu":
            return scores + self.bias > self.predict_threshold, None
        return self.act(scores).abs() > self.predict_threshold, None


@dataclass(frozen=True)
class SparsityChoice:
    """What `--sparsity` asked for: "dense", a SwiGLU level, or ReLU's natural sparsity."""

    mode: str  # "dense" | "predictor" | "cats"
    level: float | None  # SwiGLU sparsity level; None for dense and ReLU

    @property
    def label(self) -> str:
        if self.mode == "dense":
            return "dense"
        return f"{self.mode}:{self.level}" if self.level is not None else self.mode


def parse_sparsity(
    text: str, kind: str, gate_resident: bool, default_level: float
) -> SparsityChoice:
    """`--sparsity`: "dense", "auto" (the store's default), or a level such as "0.7"."""
    text = text.strip().lower()
    if text == "dense":
        return SparsityChoice("dense", None)
    mode = "cats" if gate_resident else "predictor"
    if kind == "relu":
        if text not in ("auto", "relu"):
            raise MemtoolError(
                f"--sparsity {text}: a ReLU model's sparsity is its own; use auto or dense"
            )
        return SparsityChoice(mode, None)
    if text == "auto":
        return SparsityChoice(mode, default_level)
    try:
        level = float(text)
    except ValueError:
        raise MemtoolError(
            f"--sparsity {text!r}: use dense, auto or one of the calibrated levels "
            f"{', '.join(map(str, LEVELS))}"
        ) from None
    if level not in LEVELS:
        raise MemtoolError(
            f"--sparsity {level} is not calibrated in this store: use one of "
            f"{', '.join(map(str, LEVELS))}, or dense"
        )
    return SparsityChoice(mode, level)


def mlp_input_module(layer: nn.Module) -> nn.Module:
    """The module whose input is the FFN input: `mlp` (SwiGLU) or `fc1` (OPT)."""
    mlp = getattr(layer, "mlp", None)
    return mlp if mlp is not None and hasattr(mlp, "gate_proj") else layer.fc1


def ffn_parts(layer: nn.Module) -> tuple[str, nn.Linear, nn.Module]:
    """(kind, the linear the selection predicts (gate or fc1), the activation)."""
    mlp = getattr(layer, "mlp", None)
    if mlp is not None and hasattr(mlp, "gate_proj"):
        return "swiglu", mlp.gate_proj, mlp.act_fn
    return "relu", layer.fc1, layer.activation_fn


@torch.no_grad()
def collect_ffn_inputs(
    model: nn.Module, input_ids: Tensor, batch_size: int = 4, show: bool = True
) -> list[Tensor]:
    """Every layer's FFN inputs over the calibration windows, as float32 [N, H]."""
    layers = decoder_layers(model)
    captured: list[list[Tensor]] = [[] for _ in layers]
    handles = []
    for index, layer in enumerate(layers):

        def hook(_module, args, index=index):
            x = args[0]
            captured[index].append(x.reshape(-1, x.shape[-1]).float().cpu())

        handles.append(mlp_input_module(layer).register_forward_pre_hook(hook))
    try:
        with counted_steps("FFN inputs", input_ids.shape[0], show) as (bar, task):
            for start in range(0, input_ids.shape[0], batch_size):
                model(input_ids=input_ids[start : start + batch_size], use_cache=False)
                bar.advance(task, min(batch_size, input_ids.shape[0] - start))
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(parts) for parts in captured]


def _kth(values: Tensor, fraction: float) -> float:
    """The value below which `fraction` of `values` lie (a quantile without torch.quantile's
    16M-element limit)."""
    flat = values.flatten()
    k = min(flat.numel(), max(1, round(fraction * flat.numel())))
    return float(flat.kthvalue(k).values)


def _cholesky_upper(cov: Tensor) -> Tensor:
    """U with cov + λI = Uᵀ U, λ growing from 1e-6 of the mean diagonal until it factors: a
    LayerNorm output has no component along the all-ones direction, so its covariance is
    singular by construction (OPT), and fp32 rounding may leave it just short of positive."""
    mean = float(cov.diagonal().mean()) or 1.0
    for damp in (1e-6, 1e-4, 1e-2, 1e-1):
        factor, info = torch.linalg.cholesky_ex(cov + torch.eye(cov.shape[0]) * damp * mean)
        if int(info) == 0:
            return factor.T
    raise MemtoolError("calibration inputs are degenerate: cannot fit a low-rank predictor")


@torch.no_grad()
def fit_layer(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    act: nn.Module,
    kind: str,
    predictor: str,
    recall: float,
) -> tuple[dict[str, Tensor], dict]:
    """Fit one layer's predictor and thresholds; returns (tensors, json-ready facts)."""
    half = x.shape[0] // 2
    fit_x, check_x = x[:half], x[half:]
    weight = weight.float()
    method, number = parse_predictor(predictor)
    facts: dict = {"predictor": predictor}
    if method == "quant":
        quantized = rtn_quantize(weight, number, PREDICTOR_GROUP, sym=False)
        tensors = pack_gptq(
            quantized.codes.T.to(torch.int32),
            quantized.zeros.T.contiguous(),
            quantized.scales.T.contiguous(),
            quantized.g_idx,
            number,
        )
        pred = check_x @ quantized.dequantize().T
    else:
        upper = _cholesky_upper(fit_x.T @ fit_x / max(1, half))
        u, s, vh = torch.linalg.svd(upper @ weight.T, full_matrices=False)
        rank = min(number, s.numel())
        a = torch.linalg.solve_triangular(upper, u[:, :rank] * s[:rank], upper=True)
        tensors = {"a": a, "b": vh[:rank]}
        pred = (check_x @ a) @ vh[:rank]
    true = check_x @ weight.T
    if kind == "relu":
        bias = bias.float() if bias is not None else torch.zeros(weight.shape[0])
        tensors["bias"] = bias
        truth = true + bias > 0
        score = pred + bias
        threshold = _kth(score[truth], 1 - recall) if bool(truth.any()) else 0.0
        chosen = score > threshold
        facts["relu"] = {
            "predict": threshold,
            "active_fraction": float(truth.float().mean()),
            "predicted_fraction": float(chosen.float().mean()),
            "recall": float((chosen & truth).sum() / truth.sum().clamp(min=1)),
        }
        return tensors, facts
    magnitude, predicted = act(true).abs(), act(pred).abs()
    for level in LEVELS:
        cats = _kth(magnitude, level)
        truth = magnitude > cats
        threshold = _kth(predicted[truth], 1 - recall)
        chosen = predicted > threshold
        facts[str(level)] = {
            "cats": cats,
            "predict": threshold,
            "active_fraction": float(truth.float().mean()),
            "predicted_fraction": float(chosen.float().mean()),
            "recall": float((chosen & truth).sum() / truth.sum().clamp(min=1)),
        }
    return tensors, facts


def calibrate_predictors(
    model: nn.Module,
    input_ids: Tensor,
    predictor: str | None = None,
    recall: float = DEFAULT_RECALL,
    dtype: torch.dtype = torch.bfloat16,
    show: bool = True,
) -> tuple[dict[str, Tensor], dict]:
    """Predictors and thresholds for every layer of `model` from calibration windows.

    Returns (tensors named `layers.{i}.a|b|bias`, metadata for `predictors.json`).
    """
    if not 0 < recall <= 1:
        raise MemtoolError(f"predictor recall must be in (0, 1], not {recall}")
    inputs = collect_ffn_inputs(model, input_ids, show=show)
    layers = decoder_layers(model)
    hidden = inputs[0].shape[1]
    predictor = predictor or default_predictor(ffn_parts(layers[0])[0], hidden)
    parse_predictor(predictor)
    tensors, per_layer = {}, []
    with counted_steps("neuron predictors", len(layers), show) as (bar, task):
        for index, (layer, x) in enumerate(zip(layers, inputs, strict=True)):
            kind, linear, act = ffn_parts(layer)
            weight = linear.weight.detach()
            found, facts = fit_layer(x, weight, linear.bias, act, kind, predictor, recall)
            for name, value in found.items():
                value = value.to(dtype) if value.is_floating_point() and name != "scales" else value
                tensors[f"layers.{index}.{name}"] = value.contiguous()
            per_layer.append(facts)
            inputs[index] = None  # free as we go
            bar.advance(task)
    meta = {"predictor": predictor, "recall": recall, "tokens": int(input_ids.numel())}
    meta["layers"] = per_layer
    return tensors, meta


def save_predictors(folder, tensors: dict[str, Tensor], meta: dict) -> None:
    """Write predictors into a store folder being built (called inside its atomic write)."""
    save_file(tensors, str(folder / PREDICTOR_FILE))
    meta = dict(meta, crc32=file_crc32(folder / PREDICTOR_FILE))
    (folder / PREDICTOR_META).write_text(json.dumps(meta, indent=1))


def load_predictors(folder) -> tuple[dict[str, Tensor], dict] | None:
    """The store's predictors, or None when it has none; checks their CRC32."""
    meta_path = folder / PREDICTOR_META
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    if file_crc32(folder / PREDICTOR_FILE) != meta["crc32"]:
        raise MemtoolError(f"{folder / PREDICTOR_FILE} fails its CRC32: damaged; rebuild the store")
    return load_file(str(folder / PREDICTOR_FILE)), meta


def summarize(meta: dict, choice: SparsityChoice) -> dict:
    """Mean calibration facts of the chosen level across layers (for reports)."""
    key = "relu" if choice.level is None else str(choice.level)
    rows: Sequence[dict] = [layer[key] for layer in meta["layers"] if key in layer]
    if not rows or choice.mode == "dense":
        return {}
    mean = lambda name: sum(r[name] for r in rows) / len(rows)  # noqa: E731
    return {
        "active_fraction": mean("active_fraction"),
        "predicted_fraction": mean("predicted_fraction"),
        "recall": mean("recall"),
    }
