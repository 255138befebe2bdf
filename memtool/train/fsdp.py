"""ZeRO stage 3 through PyTorch FSDP2 (`fully_shard`): parameters, gradients and optimizer
states sharded across ranks.

Each decoder layer is its own FSDP unit (its parameters are gathered just before it runs and
freed after), the root holds the rest (embeddings, final norm, a tied head). Mixed precision goes
through `MixedPrecisionPolicy` (compute in bf16, reduce and keep fp32 masters); optimizer offload
through `CPUOffloadPolicy`, whose default pins host memory — which fails on a CPU-only machine,
so memtool pins only when the device is CUDA. The optimizer is torch's AdamW over the sharded
DTensor parameters (FSDP2's documented pairing), so its state is sharded with them.

Same interface as `memtool.train.zero.ZeroOptimizer`, so the training loop does not care which
stage runs.
"""

from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor

from memtool.models.layers import decoder_layers
from memtool.train.config import OptimConfig
from memtool.train.distributed import Dist


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class FSDPOptimizer:
    """AdamW over an FSDP2-sharded model (module docstring). `model` is sharded in place."""

    def __init__(
        self,
        model: nn.Module,
        optim: OptimConfig,
        group: Dist,
        compute_dtype: torch.dtype,
        offload: bool,
    ) -> None:
        self.optim, self.group, self.offload = optim, group, offload
        mixed = MixedPrecisionPolicy(
            param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
            reduce_dtype=torch.float32,
        )
        placement = (
            CPUOffloadPolicy(pin_memory=group.device.type == "cuda") if offload else OffloadPolicy()
        )
        if not offload:
            model.to(group.device)
        for layer in decoder_layers(model):
            fully_shard(layer, mp_policy=mixed, offload_policy=placement)
        fully_shard(model, mp_policy=mixed, offload_policy=placement)
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        # fused AdamW does not take DTensors on every backend; foreach is the FSDP2 default
        self.adamw = torch.optim.AdamW(
            self.params,
            lr=optim.lr,
            betas=optim.betas,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
        )

    def after_backward(self) -> None:
        """Nothing to do: FSDP2 reduce-scatters gradients during backward."""

    def step(self, step: int) -> torch.Tensor:
        """One optimizer step; returns the global gradient norm before clipping (a 0-dim
        tensor: reading it waits for the device)."""
        max_norm = self.optim.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(
            self.params, max_norm if max_norm is not None else float("inf")
        )
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        for param_group in self.adamw.param_groups:
            param_group["lr"] = self.optim.lr_at(step)
        self.adamw.step()
        self.adamw.zero_grad(set_to_none=True)
        return norm

    def memory(self) -> dict[str, int]:
        """Bytes this rank holds at rest, by role (see `ZeroOptimizer.memory`)."""
        params = sum(_local(p).nbytes for p in self.params)
        states = 0
        for state in self.adamw.state.values():
            tensors = [t for t in state.values() if torch.is_tensor(t) and t.dim()]
            states += sum(_local(t).nbytes for t in tensors)
        grads = params  # the reduced gradient shards, one per parameter shard, fp32
        if self.offload:
            return {
                "param_bytes": 0,
                "grad_bytes": 0,
                "optimizer_state_bytes": 0,
                "host_param_bytes": params,
                "host_grad_bytes": grads,
                "host_optimizer_state_bytes": states,
            }
        return {"param_bytes": params, "grad_bytes": grads, "optimizer_state_bytes": states}

    def shard_state(self) -> dict[str, torch.Tensor]:
        """This rank's shards of every parameter and its Adam moments."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        out = {}
        for param in self.params:
            name = names[id(param)]
            out[f"param.{name}"] = _local(param).detach()
            for key, value in self.adamw.state.get(param, {}).items():
                if torch.is_tensor(value) and value.dim():
                    out[f"{key}.{name}"] = _local(value)
        return out

    def load_shard_state(self, tensors: dict[str, torch.Tensor], steps_done: int) -> None:
        names = {id(p): n for n, p in self.model.named_parameters()}
        for param in self.params:
            name = names[id(param)]
            _local(param).data.copy_(tensors[f"param.{name}"])
            if steps_done:
                state = self.adamw.state[param]
                for key in ("exp_avg", "exp_avg_sq"):
                    moment = torch.zeros_like(param)
                    _local(moment).copy_(tensors[f"{key}.{name}"])
                    state[key] = moment
                state["step"] = torch.tensor(float(steps_done), dtype=torch.float32)

    def reshard(self, shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """This rank's `shard_state` cut from every rank's shard of a run on another number of
        ranks: FSDP2 shards each tensor along dim 0 as `torch.chunk` does (the last ranks may
        hold less, or nothing), so the shards are rejoined and chunked anew."""
        rank, world = self.group.rank, self.group.world_size
        out = {}
        for key in shards[0]:
            full = torch.cat([s[key] for s in shards], dim=0)
            chunks = list(torch.chunk(full, world, dim=0))
            chunks += [full[:0]] * (world - len(chunks))
            out[key] = chunks[rank].clone()
        return out

    def full_parameters(self, model: nn.Module) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
        """Each parameter's full value (collective: every rank iterates and gathers)."""
        for param in self.params:
            full = param.full_tensor() if isinstance(param, DTensor) else param
            yield param, full.detach().float()

    def close(self) -> None:
        """Nothing to release: FSDP2's hooks live with the model."""
