"""Loading a BitStack stack at a memory budget, and resizing the loaded model in place.

The base (embeddings, norms, head) stays in its stored 16-bit dtype, as the budget counts it;
when the model computes in float32 those weights are widened on use through a parametrization
(a transient copy per call, like the decomposed linears' reconstruction), so what the model
holds is what the budget says. Computing in bfloat16 on CPU would avoid that but runs about five
times slower here.
"""

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from torch.nn.utils import parametrize

from memtool.errors import MemtoolError
from memtool.formats.bitstack_linear import BitStackLinear
from memtool.formats.bitstack_stack import BASE_FILE, INPUT_SCALE, StackFile
from memtool.models.safetensors_check import check_safetensors
from memtool.sizes import parse_size


class _Widen(nn.Module):
    """Parametrization: the stored 16-bit tensor, computed with in `dtype`."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.to(self.dtype)


class BitStackState:
    """The loaded part of a stack, and the means to grow or shrink it.

    After any sequence of `set_budget` calls the model equals a fresh load at the last budget
    exactly: every linear holds the same blocks in the same order, and its weight is rebuilt
    from them on each call.
    """

    def __init__(self, stack: StackFile, modules: list[BitStackLinear]) -> None:
        self.stack = stack
        self.modules = modules
        self.n_blocks = 0

    @property
    def weight_bytes(self) -> int:
        """Every weight byte the model holds at the current size."""
        return self.stack.weight_bytes[self.n_blocks - self.stack.min_blocks]

    def set_budget(self, budget: int | str | None) -> int:
        """Load or drop blocks to fit `budget` (bytes or "300MB"; None = the whole stack).

        Returns the number of blocks now loaded.
        """
        budget_bytes = None if budget is None else parse_size(budget)
        self.set_blocks(self.stack.blocks_for_budget(budget_bytes))
        return self.n_blocks

    def set_blocks(self, n_blocks: int) -> None:
        """Hold exactly the first `n_blocks` blocks of the stack."""
        if not self.stack.min_blocks <= n_blocks <= len(self.stack.stack):
            raise MemtoolError(
                f"{n_blocks} blocks: a model holds between {self.stack.min_blocks} and "
                f"{len(self.stack.stack)}"
            )
        if n_blocks > self.n_blocks:
            grouped: dict[int, list] = {}
            for linear, signs, u, v in self.stack.read(self.n_blocks, n_blocks):
                grouped.setdefault(linear, []).append((signs, u, v))
            for linear, blocks in grouped.items():
                signs, u, v = (torch.stack(parts) for parts in zip(*blocks, strict=True))
                self.modules[linear].append_blocks(signs, u, v)
        elif n_blocks < self.n_blocks:
            for linear, count in enumerate(self.stack.counts(n_blocks)):
                if self.modules[linear].n_blocks != count:
                    self.modules[linear].keep_blocks(count)
        self.n_blocks = n_blocks


def load_bitstack_model(
    folder, dtype: torch.dtype, budget: int | str | None
) -> tuple[nn.Module, BitStackState]:
    """Build the model of a stack folder holding the blocks that fit `budget`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    stack = StackFile(folder)
    budget_bytes = None if budget is None else parse_size(budget)
    n_blocks = stack.blocks_for_budget(budget_bytes)  # a bad budget fails before any loading
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    check_safetensors(folder / BASE_FILE)
    with safe_open(str(folder / BASE_FILE), framework="pt") as handle:
        base = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    modules = []
    for spec in stack.linears:
        parent_name, _, child = spec.name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
        except AttributeError:
            raise MemtoolError(f"{folder}: {spec.name} is not a module of this model") from None
        old = getattr(parent, child, None)
        if not isinstance(old, nn.Linear) or (old.out_features, old.in_features) != (
            spec.out_features,
            spec.in_features,
        ):
            raise MemtoolError(f"{folder}: {spec.name} does not match the model's config")
        scale = base.pop(f"{spec.name}.{INPUT_SCALE}", None)
        if spec.input_scale and scale is None:
            raise MemtoolError(f"{folder}: the input scale of {spec.name} is missing")
        bias = base.pop(f"{spec.name}.bias", None)
        module = BitStackLinear(spec.in_features, spec.out_features, spec.rank, bias, scale)
        setattr(parent, child, module)
        modules.append(module)
    if dtype.itemsize == 2:  # compute in the 16-bit dtype itself: nothing to widen
        base = {k: v.to(dtype) if v.is_floating_point() else v for k, v in base.items()}
    missing, unexpected = model.load_state_dict(base, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    names = {spec.name for spec in stack.linears}
    missing = [k for k in missing if k.rsplit(".", 1)[0] not in names]
    if missing or unexpected:
        raise MemtoolError(
            f"{folder}: base weights do not match the config (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    _widen_stored(model, dtype)
    state = BitStackState(stack, modules)
    state.set_blocks(n_blocks)
    model.eval()
    return model, state


def _widen_stored(model: nn.Module, dtype: torch.dtype) -> None:
    """Compute with 16-bit stored parameters in `dtype` without holding a wide copy."""
    for module in list(model.modules()):
        if isinstance(module, BitStackLinear):
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_floating_point() and param.dtype != dtype:
                param.requires_grad_(False)
                parametrize.register_parametrization(module, name, _Widen(dtype), unsafe=True)
