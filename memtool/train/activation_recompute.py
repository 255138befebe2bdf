"""Recomputation in backward: whole decoder layers ("full") and MEMO's token-wise scheme ("tokens").

MEMO (Zhao et al., "Efficiently Training 7B LLM with 1 Million Sequence Length on 8 GPUs", arXiv
2407.12117) keeps almost nothing of a layer on the device: it always swaps the layer input and the
attention core's output (with its softmax statistics) to host memory, swaps the other saved
activations for a fraction alpha of the tokens, and recomputes them for the remaining tokens before
the layer's backward. That works because everything in a transformer layer except the attention core
is token-wise (norms, QKV projections, RoPE, o_proj, MLP, residuals): from the layer input and the
attention output, any token's activations can be recomputed on their own.

`tokenwise_forward` is that scheme for Llama-family layers (Llama, Mistral, Qwen2). The layer is
re-expressed with its own submodules in two token-wise halves around the attention core: "pre"
(input norm, projections, RoPE) and "post" (o_proj, residual, norm, MLP, residual). The first
⌊alpha·S⌋ tokens run both halves with every saved tensor swapped; the other tokens run them inside
`Region`s that save nothing but views of the (swapped) layer input and attention output; the
attention function HF would call runs once over all tokens in between. Its saved q, k and v are
split the same way: the swapped tokens' part is swapped, the rest is taken from the pre region's
recomputation, which then also serves that region's own backward (one recomputation, not two).

What differs from the paper, deliberately:
- The swapped set is whatever autograd saves for those ops, deduplicated by storage, not a list
  worked out per operator; the swapped tokens are a prefix, the recomputed ones the suffix.
- Recomputation runs when the layer's backward first needs it (an unpack), not scheduled ahead of
  it, so it does not overlap the previous layer's backward.
- MEMO's bi-level MIP memory planner is not reproduced; PyTorch's caching allocator does the rest.
- Attention backends that save more than q, k, v, output and statistics (eager's probabilities,
  repeated k/v under a padding mask with GQA) have those tensors swapped whole: correct, less lean.

"full" checkpoints each decoder layer with the same `Region` machinery. Unlike the non-reentrant
`torch.utils.checkpoint`, whose closure keeps the layer inputs on the device where saved-tensor
hooks never see them, a region's inputs go through the store, so they are counted and can be
swapped. Like the reentrant variant, parameter gradients accumulate into `.grad` during backward
(`torch.autograd.grad` and `retain_graph=True` are not supported through a region). The CPU and
CUDA random states and autocast are replayed, so dropout masks match.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from memtool.errors import MemtoolError
from memtool.train.activation_swap import ALWAYS, SavedTensorStore

TOKENWISE_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")

# Outputs of a region must require grad whenever grad is enabled, even when no input does (frozen
# embeddings feeding a trainable layer): this leaf rides along as an input that always does.
_ANCHOR = torch.empty(0, requires_grad=True)


def supports_tokenwise(layer: nn.Module) -> bool:
    """Whether "tokens" recomputation knows this decoder layer (FSDP2 subclasses included)."""
    return any(cls.__name__ in TOKENWISE_LAYERS for cls in type(layer).__mro__)


class Region:
    """A piece of forward that backward recomputes: `fn(*inputs)`, its inputs held by the store."""

    def __init__(
        self, store: SavedTensorStore, fn: Callable, inputs: tuple[Tensor, ...], tokens: int
    ) -> None:
        self.store, self.fn, self.tokens = store, fn, tokens
        self.layer = store.layer  # the decoder layer running now: its recomputation is counted
        self.held = [store.pack(t) for t in inputs]
        self.requires_grad = [t.requires_grad for t in inputs]
        device = inputs[0].device
        self.device_type = device.type
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.cuda_device = device
        self.autocast = (
            torch.is_autocast_enabled(device.type),
            torch.get_autocast_dtype(device.type),
        )
        self._cache: tuple[list[Tensor], tuple[Tensor, ...]] | None = None

    def recompute(self) -> tuple[list[Tensor], tuple[Tensor, ...]]:
        """(inputs, outputs) of `fn` run again with grad; computed once, then cached."""
        if self._cache is None:
            inputs = [
                self.store.unpack(h).detach().requires_grad_(r)
                for h, r in zip(self.held, self.requires_grad, strict=True)
            ]
            devices = [self.cuda_device] if self.cuda_rng is not None else []
            enabled, dtype = self.autocast
            layer, self.store.layer = self.store.layer, self.layer
            try:
                with torch.random.fork_rng(devices=devices), self.store.recomputing():
                    torch.set_rng_state(self.cpu_rng)
                    if self.cuda_rng is not None:
                        torch.cuda.set_rng_state(self.cuda_rng, self.cuda_device)
                    with torch.enable_grad(), torch.autocast(self.device_type, dtype, enabled):
                        outputs = self.fn(*inputs)
            finally:
                self.store.layer = layer
            self.store.recomputed_tokens += self.tokens
            self._cache = (inputs, outputs)
        return self._cache

    def output(self, index: int) -> Tensor:
        """Output `index` of the recomputation, as a plain tensor (the attention core's q/k/v)."""
        return self.recompute()[1][index].detach()

    def release(self) -> None:
        self._cache = None
        self.held = []


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, region: Region, anchor: Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:
        ctx.region = region
        outputs = region.fn(*inputs)
        ctx.mark_non_differentiable(*[o for o in outputs if not o.is_floating_point()])
        return outputs

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        region = ctx.region
        inputs, outputs = region.recompute()
        pairs = zip(outputs, grads, strict=True)
        pairs = [(o, g) for o, g in pairs if g is not None and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        result = (None, None, *[t.grad if t.requires_grad else None for t in inputs])
        region.release()
        return result


def run_region(region: Region, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Run `region.fn` now without saving anything; backward recomputes it."""
    return _Recompute.apply(region, _ANCHOR, *inputs)


def _refuse_cache(cache: object, past_key_values: object = None) -> None:
    if cache is not None or past_key_values is not None:
        raise MemtoolError(
            "activation recomputation needs use_cache=False: replaying a layer in backward "
            "would write its KV cache twice"
        )


def checkpointed_forward(store: SavedTensorStore, forward: Callable, *args, **kwargs):
    """A decoder layer's `forward`, recomputed in backward from inputs held by `store`."""
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    _refuse_cache(kwargs.get("cache"), kwargs.get("past_key_values"))
    leaves, spec = tree_flatten((args, kwargs))
    where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
    # The closure must not hold the tensors themselves, or they would stay on the device unseen.
    template = [None if isinstance(leaf, Tensor) else leaf for leaf in leaves]
    structure: list = []

    def fn(*tensors: Tensor) -> tuple[Tensor, ...]:
        filled = list(template)
        for i, t in zip(where, tensors, strict=True):
            filled[i] = t
        call_args, call_kwargs = tree_unflatten(filled, spec)
        out_leaves, out_spec = tree_flatten(forward(*call_args, **call_kwargs))
        structure[:] = [[None if isinstance(o, Tensor) else o for o in out_leaves], out_spec]
        return tuple(o for o in out_leaves if isinstance(o, Tensor))

    tensors = tuple(leaves[i] for i in where)
    tokens = tensors[0].shape[:-1].numel()
    outputs = iter(run_region(Region(store, fn, tensors, tokens), tensors))
    out_template, out_spec = structure
    return tree_unflatten([next(outputs) if o is None else o for o in out_template], out_spec)


def _pre(layer: nn.Module, rope: Callable, x: Tensor, cos: Tensor, sin: Tensor):
    """Input norm, projections and RoPE of some tokens: HF's LlamaAttention up to the core."""
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    shape = (*x.shape[:-1], -1, attn.head_dim)
    q = attn.q_proj(h).view(shape).transpose(1, 2)
    k = attn.k_proj(h).view(shape).transpose(1, 2)
    v = attn.v_proj(h).view(shape).transpose(1, 2)
    q, k = rope(q, k, cos, sin)
    return q, k, v


def _join_tokens(parts: list[Tensor]) -> Tensor:
    """Concatenate [B, heads, tokens, D] pieces with HF's memory layout ([B, tokens, heads, D]
    underneath), so the attention core sees the strides it sees in HF's layer and returns its
    output in the layout whose `.transpose(1, 2).contiguous()` is free."""
    return torch.cat([p.transpose(1, 2) for p in parts], dim=1).transpose(1, 2)


def _post(layer: nn.Module, x: Tensor, o: Tensor) -> tuple[Tensor]:
    """o_proj, residual, norm, MLP and residual of some tokens: the rest of HF's decoder layer."""
    h = x + layer.self_attn.o_proj(o.reshape(*x.shape[:-1], -1).contiguous())
    return (h + layer.mlp(layer.post_attention_layernorm(h)),)


def tokenwise_forward(
    store: SavedTensorStore, layer: nn.Module, forward: Callable, alpha: float, *args, **kwargs
):
    """A Llama-family decoder layer's `forward` under MEMO: alpha of the tokens swapped, the rest
    recomputed token-wise, the attention core run once over all of them."""
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return _tokenwise(store, layer, alpha, *args, **kwargs)


def _tokenwise(
    store: SavedTensorStore,
    layer: nn.Module,
    alpha: float,
    hidden_states: Tensor,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    cache: object = None,
    use_cache: bool | None = False,
    position_embeddings: tuple[Tensor, Tensor] | None = None,
    past_key_values: object = None,
    **kwargs,
) -> Tensor:
    # The signature is HF's LlamaDecoderLayer.forward, so HF's calls bind the same way.
    _refuse_cache(cache, past_key_values)
    if position_embeddings is None:
        raise MemtoolError("recompute='tokens' needs the model to pass position_embeddings")
    x, (cos, sin) = hidden_states, position_embeddings
    batch, seq = x.shape[:2]
    split = min(seq, math.floor(alpha * seq))  # tokens [0, split) swapped, [split, seq) recomputed
    attn = layer.self_attn
    module = sys.modules[type(attn).__module__]
    pre = functools.partial(_pre, layer, module.apply_rotary_pos_emb)
    post = functools.partial(_post, layer)
    swapped: tuple[Tensor, ...] = ()
    recomputed: tuple[Tensor, ...] = ()
    pre_region = None
    # RoPE's tables are swapped whole as soon as any token is: MEMO's always-swapped part too.
    with store.category(ALWAYS, x, cos, sin):
        if split == seq:  # no slices: the layer's graph is then HF's, operation for operation
            swapped = pre(x, cos, sin)
        elif split:
            swapped = pre(x[:, :split], cos[:, :split], sin[:, :split])
        if split < seq:
            tail = (x[:, split:], cos[:, split:], sin[:, split:])
            pre_region = Region(store, pre, tail, tokens=0)
            recomputed = run_region(pre_region, tail)
        pieces = [p for p in (swapped, recomputed) if p]
        q, k, v = (_join_tokens(ts) if len(ts) > 1 else ts[0] for ts in zip(*pieces, strict=True))
        splits = [
            (full, swapped[i] if split else None,
             None if pre_region is None else functools.partial(pre_region.output, i))
            for i, full in enumerate((q, k, v))
        ]  # fmt: skip
        o = _attention_core(store, attn, module, splits, q, k, v, attention_mask,
                            position_ids=position_ids, use_cache=use_cache, **kwargs)  # fmt: skip
        with store.category(ALWAYS, o):
            outs = []
            if split == seq:
                outs.append(post(x, o)[0])
            elif split:
                outs.append(post(x[:, :split], o[:, :split])[0])
            if split < seq:
                tail = (x[:, split:], o[:, split:])
                outs.append(run_region(Region(store, post, tail, batch * (seq - split)), tail)[0])
    return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]


def _attention_core(store, attn, module, splits, q, k, v, attention_mask, **kwargs) -> Tensor:
    """The attention function HF would call (sdpa, flash, eager...), with its saves split."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    interface = ALL_ATTENTION_FUNCTIONS.get_interface(
        attn.config._attn_implementation, module.eager_attention_forward
    )
    # Qwen2 passes its per-layer window, Mistral its config's; Llama passes none.
    if hasattr(attn, "sliding_window"):
        kwargs["sliding_window"] = attn.sliding_window
    elif getattr(attn.config, "sliding_window", None) is not None:
        kwargs["sliding_window"] = attn.config.sliding_window
    with store.splitting(splits, _join_tokens), store.category(ALWAYS):
        o, _ = interface(
            attn, q, k, v, attention_mask,
            dropout=attn.attention_dropout if attn.training else 0.0,
            scaling=attn.scaling, **kwargs,
        )  # fmt: skip
    return o
