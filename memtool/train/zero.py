"""ZeRO stages 0-2 over flat buckets, with optional optimizer offload (ZeRO-Offload).

Papers: "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models" (Rajbhandari et
al., 2020) and "ZeRO-Offload" (Ren et al., 2021). Stage 3 is PyTorch FSDP2 (`memtool.train.fsdp`);
torch.distributed has no ZeRO-2 (FSDP2's `reshard_after_forward=False` still shards parameters
at rest), so stages 0-2 are written here, on its collectives:

- Parameters are packed into buckets: each bucket is one flat compute-dtype buffer, padded to a
  multiple of the world size, and every parameter becomes a view into it. Rank r owns slice r of
  every bucket (stage 0: every rank owns the whole bucket).
- Stage 0/1: gradients accumulate into a flat buffer per bucket (the parameters' `.grad` are views
  into it); at the step it is all-reduced (0) or reduce-scattered (1) and divided by the world.
- Stage 2: no full gradient buffer. When the last gradient of a bucket has been accumulated in a
  micro-batch's backward, the bucket is flattened, reduce-scattered into the rank's persistent
  gradient shard and the parameters' `.grad` are freed (DeepSpeed's ZeRO-2 also reduces every
  micro-batch).
- The optimizer is AdamW over the rank's fp32 master shards; its state is therefore sharded.
  On the compute device, where Triton runs (CUDA), memtool's fused kernel
  (`memtool.ops.adamw_step`) steps each bucket in one pass: clipping, the AdamW update and the
  write of the compute-dtype weights (no separate copy). Elsewhere (CPU, 8-bit states, offload)
  torch's fused AdamW or bitsandbytes' steps it. Both keep torch AdamW's state layout, so
  checkpoints move between them. With an fp32 compute dtype and no offload the master shard is
  a view of the parameters themselves (no extra copy). After the step the shards are
  all-gathered back into the flat parameter buffers.
- Offload: master shards, Adam moments and an fp32 copy of the gradient shard live in host memory
  (pinned when the device is CUDA); AdamW(fused=True) steps them on the CPU and the new weights are
  copied back to the device shard in the compute dtype.

Clipping uses the global gradient norm (each rank's shard squared, summed over ranks), with
torch's `clip_grad_norm_` coefficient, so the update equals single-process AdamW's.
"""

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from memtool import ops
from memtool.train.config import OptimConfig
from memtool.train.distributed import Dist

# torch 2.13 renamed reduce_scatter_tensor / all_gather_into_tensor (deprecated since)
_reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
_all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
BUCKET_NUMEL = 1 << 24  # 16M elements: a few large collectives per step, bounded transients


@dataclass
class _Bucket:
    params: list[nn.Parameter]
    offsets: list[int]
    numel: int  # padded to a multiple of the world size
    owned: slice  # this rank's slice of the flat buffers
    flat_param: torch.Tensor = field(init=False)
    flat_grad: torch.Tensor | None = None  # stages 0 and 1
    grad_shard: torch.Tensor | None = None  # stage 2 (and the reduced gradient of stage 1)
    master: nn.Parameter = field(init=False)  # fp32 master of the owned slice
    ready: int = 0  # stage 2: gradients accumulated in the current backward


def _unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _plan_buckets(params: list[nn.Parameter], world_size: int, stage: int) -> list[_Bucket]:
    groups: list[list[nn.Parameter]] = [[]]
    size = 0
    for param in params:
        if groups[-1] and size + param.numel() > BUCKET_NUMEL:
            groups.append([])
            size = 0
        groups[-1].append(param)
        size += param.numel()
    buckets = []
    for group in groups:
        offsets, total = [], 0
        for param in group:
            offsets.append(total)
            total += param.numel()
        padded = -(-total // world_size) * world_size
        shard = padded // world_size
        rank = dist.get_rank()
        owned = slice(0, padded) if stage == 0 else slice(rank * shard, (rank + 1) * shard)
        buckets.append(_Bucket(group, offsets, padded, owned))
    return buckets


def _adamw(masters: list[nn.Parameter], optim: OptimConfig, bits: int) -> torch.optim.Optimizer:
    if bits == 8:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(
            masters, lr=optim.lr, betas=optim.betas, eps=optim.eps,
            weight_decay=optim.weight_decay,
        )  # fmt: skip
    return torch.optim.AdamW(
        masters,
        lr=optim.lr,
        betas=optim.betas,
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        fused=True,  # torch's fused AdamW runs on CPU and CUDA; the fastest CPU step
    )


def _step_value(optimizer: torch.optim.Optimizer, steps: int, device: torch.device):
    """The `step` state entry as each optimizer keeps it (fused AdamW: a float32 tensor on the
    parameter's device; bitsandbytes: an int)."""
    if isinstance(optimizer, torch.optim.AdamW):
        return torch.tensor(float(steps), dtype=torch.float32, device=device)
    return steps


class ZeroOptimizer:
    """AdamW over a model's parameters with ZeRO stage 0, 1 or 2 sharding (module docstring).

    Args:
        model: The model, its parameters in fp32 (they become views into flat buffers, cast to
            `compute_dtype`).
        stage: 0, 1 or 2.
        optim: Learning rate, betas, weight decay, clipping.
        group: The process group's rank, world size and compute device.
        compute_dtype: dtype of the weights the forward pass sees.
        offload: Keep master weights, moments and the fp32 gradient shard in host memory.
        optimizer_bits: 32 for fp32 moments (memtool's fused kernel where Triton runs, else
            torch's fused AdamW); 8 for bitsandbytes' AdamW8bit (block-wise 8-bit moments: 2
            bytes per parameter instead of 8).
    """

    def __init__(
        self,
        model: nn.Module,
        stage: int,
        optim: OptimConfig,
        group: Dist,
        compute_dtype: torch.dtype,
        offload: bool,
        optimizer_bits: int = 32,
    ) -> None:
        self.stage, self.optim, self.group, self.offload = stage, optim, group, offload
        self.compute_dtype = compute_dtype
        pin = group.device.type == "cuda"
        self.buckets = _plan_buckets(_unique_parameters(model), group.world_size, stage)
        masters = []
        for bucket in self.buckets:
            self._pack(bucket)
            shard_numel = bucket.owned.stop - bucket.owned.start
            master_view = bucket.flat_param[bucket.owned]
            if offload:
                master = torch.empty(shard_numel, dtype=torch.float32, pin_memory=pin)
                master.copy_(master_view)
            elif compute_dtype == torch.float32:
                master = master_view  # the parameters are the master weights
            else:
                master = master_view.float().clone()
            bucket.master = nn.Parameter(master)
            masters.append(bucket.master)
            if stage == 2:
                bucket.grad_shard = torch.zeros(
                    shard_numel, dtype=compute_dtype, device=group.device
                )
        for bucket in self.buckets:  # only now: the fp32 values were needed for the masters
            if bucket.flat_param.dtype != compute_dtype:
                self._cast(bucket, compute_dtype)
            if stage < 2:
                bucket.flat_grad = torch.zeros_like(bucket.flat_param)
                self._view_grads(bucket)
        if offload:
            self.host_grads = [
                torch.zeros(b.master.numel(), dtype=torch.float32, pin_memory=pin)
                for b in self.buckets
            ]
        self.adamw = _adamw(masters, optim, optimizer_bits)
        # memtool's fused step where its kernel runs on the masters' device (the Triton
        # interpreter counts, which is how CPU tests reach this path).
        self.fused_step = (
            optimizer_bits == 32
            and not offload
            and ops.train_backend_used(group.device) is ops.KernelBackend.TRITON
        )
        # Host copies of each bucket's AdamW step count (state["step"] lives on the device, as in
        # torch's fused AdamW): reading it every step would stall the device once per bucket.
        self._host_steps: dict[int, int] = {}
        self._hooks = []
        if stage == 2:
            for bucket in self.buckets:
                for param in bucket.params:
                    hook = param.register_post_accumulate_grad_hook(self._grad_ready(bucket))
                    self._hooks.append(hook)

    # -- layout -------------------------------------------------------------------------------

    def _pack(self, bucket: _Bucket) -> None:
        first = bucket.params[0]
        flat = torch.zeros(bucket.numel, dtype=first.dtype, device=self.group.device)
        for param, offset in zip(bucket.params, bucket.offsets, strict=True):
            flat[offset : offset + param.numel()].copy_(param.detach().reshape(-1))
        bucket.flat_param = flat
        self._view_params(bucket)

    def _view_params(self, bucket: _Bucket) -> None:
        for param, offset in zip(bucket.params, bucket.offsets, strict=True):
            param.data = bucket.flat_param[offset : offset + param.numel()].view(param.shape)

    def _view_grads(self, bucket: _Bucket) -> None:
        for param, offset in zip(bucket.params, bucket.offsets, strict=True):
            param.grad = bucket.flat_grad[offset : offset + param.numel()].view(param.shape)

    def _cast(self, bucket: _Bucket, dtype: torch.dtype) -> None:
        bucket.flat_param = bucket.flat_param.to(dtype)
        self._view_params(bucket)

    # -- backward -----------------------------------------------------------------------------

    def _grad_ready(self, bucket: _Bucket):
        def hook(param: torch.Tensor) -> None:
            bucket.ready += 1
            if bucket.ready == len(bucket.params):
                self._reduce_into_shard(bucket)

        return hook

    def _reduce_into_shard(self, bucket: _Bucket) -> None:
        """Stage 2: reduce-scatter this micro-batch's bucket gradient and free the full one."""
        if self.group.world_size == 1:  # the shard is the bucket: accumulate without copies
            for param, offset in zip(bucket.params, bucket.offsets, strict=True):
                if param.grad is not None:
                    bucket.grad_shard[offset : offset + param.numel()] += param.grad.reshape(-1)
                    param.grad = None
            bucket.ready = 0
            return
        flat = torch.zeros(bucket.numel, dtype=self.compute_dtype, device=self.group.device)
        for param, offset in zip(bucket.params, bucket.offsets, strict=True):
            if param.grad is not None:
                flat[offset : offset + param.numel()].copy_(param.grad.reshape(-1))
                param.grad = None
        shard = torch.empty_like(bucket.grad_shard)
        _reduce_scatter(shard, flat)
        bucket.grad_shard += shard
        bucket.ready = 0

    def after_backward(self) -> None:
        """Call after every micro-batch's backward: stage 2 flushes buckets whose parameters
        got no gradient (in bucket order, so every rank issues the same collectives)."""
        if self.stage == 2:
            for bucket in self.buckets:
                if bucket.ready or any(p.grad is not None for p in bucket.params):
                    self._reduce_into_shard(bucket)

    # -- step ---------------------------------------------------------------------------------

    def _reduced_grads(self) -> list[torch.Tensor]:
        """Every bucket's gradient over the owned slice, summed over ranks, in the compute dtype
        (not yet divided by the world size: the step folds that into its one multiplier)."""
        grads = []
        for bucket in self.buckets:
            if self.stage == 0:
                if self.group.world_size > 1:
                    dist.all_reduce(bucket.flat_grad)
                grads.append(bucket.flat_grad)
            elif self.stage == 1:
                grad = torch.empty(
                    bucket.master.numel(), dtype=self.compute_dtype, device=self.group.device
                )
                _reduce_scatter(grad, bucket.flat_grad)
                grads.append(grad)
            else:
                grads.append(bucket.grad_shard)
        return grads

    def step(self, step: int) -> torch.Tensor:
        """One optimizer step (1-based `step` for the learning-rate schedule); returns the
        global gradient norm before clipping, a 0-dim tensor on the device (reading it makes the
        host wait for the step). Leaves the gradients zeroed.

        Nothing here waits for the device: the norm, the clipping coefficient and the gradient
        multiplier stay on it (`float(norm)` before the step cost every step a stall on a GPU,
        its launches queued only after backward had drained), and the fused kernel reads the
        compute-dtype gradients as they are (a float32 copy of them cost 6 bytes a parameter
        of traffic and 4 of transient memory)."""
        grads = self._reduced_grads()
        world = self.group.world_size
        squares = torch.zeros((), dtype=torch.float32, device=self.group.device)
        for grad in grads:
            # One reduction pass in float32, without a squared or float32 copy of the gradient.
            squares += torch.linalg.vector_norm(grad, dtype=torch.float32).square()
        if self.stage > 0 and world > 1:
            dist.all_reduce(squares)
        norm = squares.sqrt() / world  # the norm of the mean gradient
        coef = torch.ones((), dtype=torch.float32, device=self.group.device)
        if self.optim.max_grad_norm is not None:
            # torch's clip_grad_norm_: max_norm / (norm + 1e-6), at most 1, in float32.
            coef = (self.optim.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        if self.fused_step:
            self._kernel_step(grads, coef, float(world), step)
        else:
            self._torch_step(grads, coef / world, step)
        for bucket in self.buckets:
            bucket.master.grad = None
            # The fused step wrote the compute weights itself.
            self._publish(bucket, copy_master=not self.fused_step)
            if bucket.flat_grad is not None:
                bucket.flat_grad.zero_()
            if bucket.grad_shard is not None:
                bucket.grad_shard.zero_()
        return norm

    def _torch_step(self, grads: list[torch.Tensor], multiplier: torch.Tensor, step: int) -> None:
        """torch's (or bitsandbytes') AdamW over the masters, the gradients scaled by
        `multiplier` (the clipping coefficient over the world size, on the device)."""
        for index, (bucket, grad) in enumerate(zip(self.buckets, grads, strict=True)):
            if self.offload:
                target = self.host_grads[index]
                target.copy_(grad)  # waits for the device: the host steps next
                target.mul_(multiplier.to(target.device))
            else:
                # In place where the gradient is already float32: the buffers are zeroed after.
                target = grad.float().mul_(multiplier)
            bucket.master.grad = target
        for param_group in self.adamw.param_groups:
            param_group["lr"] = self.optim.lr_at(step)
        self.adamw.step()

    def _kernel_step(
        self, grads: list[torch.Tensor], coef: torch.Tensor, world: float, step: int
    ) -> None:
        """The fused step: per bucket one kernel pass scales the gradient by `coef / world`,
        updates the master shard and moments (kept in torch AdamW's state layout) and, for a
        low-precision compute dtype, writes the owned compute weights rounded from the new
        masters. The step count is kept on the host (`_host_steps`): `state["step"]`, which
        checkpoints do not save, keeps the value a load gave it."""
        beta1, beta2 = self.optim.betas
        for index, (bucket, grad) in enumerate(zip(self.buckets, grads, strict=True)):
            master = bucket.master.detach()
            state = self.adamw.state[bucket.master]
            if not state:  # torch AdamW's lazy initialisation, as its fused step keeps it
                state["step"] = torch.zeros((), dtype=torch.float32, device=master.device)
                state["exp_avg"] = torch.zeros_like(master)
                state["exp_avg_sq"] = torch.zeros_like(master)
                self._host_steps[index] = 0
            elif index not in self._host_steps:
                self._host_steps[index] = int(state["step"])  # once after a load
            self._host_steps[index] += 1
            owned = bucket.flat_param[bucket.owned]
            lowp = owned if owned.data_ptr() != master.data_ptr() else None
            ops.adamw_step(
                master, grad, state["exp_avg"], state["exp_avg_sq"],
                lr=self.optim.lr_at(step), beta1=beta1, beta2=beta2, eps=self.optim.eps,
                weight_decay=self.optim.weight_decay, step=self._host_steps[index],
                grad_scale=world, clip_coef=coef, out_lowp=lowp,
            )  # fmt: skip

    def _publish(self, bucket: _Bucket, copy_master: bool = True) -> None:
        """Copy the updated master shard into the compute weights (unless the fused step wrote
        them) and gather the other ranks'."""
        owned = bucket.flat_param[bucket.owned]
        if copy_master and bucket.master.data_ptr() != owned.data_ptr():
            owned.copy_(bucket.master.detach(), non_blocking=True)
        if self.stage > 0 and self.group.world_size > 1:
            _all_gather(bucket.flat_param, owned.clone())

    # -- state --------------------------------------------------------------------------------

    def memory(self) -> dict[str, int]:
        """Bytes this rank holds, by role; `device_*` on the compute device, `host_*` in host
        memory (on a CPU-only machine both are RAM, but the roles stay distinct)."""
        params = sum(b.flat_param.nbytes for b in self.buckets)
        grads = sum(
            (b.flat_grad.nbytes if b.flat_grad is not None else 0)
            + (b.grad_shard.nbytes if b.grad_shard is not None else 0)
            for b in self.buckets
        )
        states = 0
        for bucket in self.buckets:
            state = self.adamw.state.get(bucket.master, {})
            states += sum(t.nbytes for t in state.values() if torch.is_tensor(t) and t.dim())
            if bucket.master.data_ptr() != bucket.flat_param[bucket.owned].data_ptr():
                states += bucket.master.nbytes
        if self.offload:
            host_grads = sum(t.nbytes for t in self.host_grads)
            return {
                "param_bytes": params,
                "grad_bytes": grads,
                "optimizer_state_bytes": 0,
                "host_optimizer_state_bytes": states,
                "host_grad_bytes": host_grads,
            }
        return {"param_bytes": params, "grad_bytes": grads, "optimizer_state_bytes": states}

    def shard_state(self) -> dict[str, torch.Tensor]:
        """This rank's resumable state: master shards and optimizer state tensors, per bucket."""
        out = {}
        for index, bucket in enumerate(self.buckets):
            out[f"master.{index}"] = bucket.master.detach()
            for name, value in self.adamw.state.get(bucket.master, {}).items():
                if torch.is_tensor(value) and value.dim():
                    out[f"opt.{name}.{index}"] = value
        return out

    def load_shard_state(self, tensors: dict[str, torch.Tensor], steps_done: int) -> None:
        self._host_steps.clear()
        for index, bucket in enumerate(self.buckets):
            bucket.master.data.copy_(tensors[f"master.{index}"])
            if steps_done:
                state = self.adamw.state[bucket.master]
                suffix = f".{index}"
                for key, value in tensors.items():
                    if key.startswith("opt.") and key.endswith(suffix):
                        name = key.removeprefix("opt.").removesuffix(suffix)
                        state[name] = value.to(bucket.master.device).clone()
                state["step"] = _step_value(self.adamw, steps_done, bucket.master.device)
            self._publish(bucket)

    def reshard(self, shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """This rank's `shard_state` cut from every rank's shard of a run on another number of
        ranks (same stage). Buckets do not depend on the world size, only their padding does:
        each bucket's flat master and moments are rejoined, unpadded, padded anew, and sliced."""
        out = {}
        for key in shards[0]:
            index = int(key.rsplit(".", 1)[1])
            bucket = self.buckets[index]
            total = bucket.offsets[-1] + bucket.params[-1].numel()
            # Stage 0: every rank held the whole bucket; else the shards lie end to end.
            joined = shards[0][key] if self.stage == 0 else torch.cat([s[key] for s in shards])
            flat = torch.zeros(bucket.numel, dtype=joined.dtype)
            flat[:total] = joined[:total]
            out[key] = flat[bucket.owned].clone()
        return out

    def full_parameters(self, model: nn.Module) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
        """Each parameter's full fp32 value (collective: every rank iterates)."""
        for bucket in self.buckets:
            if bucket.master.data_ptr() == bucket.flat_param[bucket.owned].data_ptr():
                flat = bucket.flat_param
            elif self.stage == 0 or self.group.world_size == 1:
                flat = bucket.master.detach().to(self.group.device)
            else:
                flat = torch.empty(bucket.numel, dtype=torch.float32, device=self.group.device)
                _all_gather(flat, bucket.master.detach().to(self.group.device))
            for param, offset in zip(bucket.params, bucket.offsets, strict=True):
                yield param, flat[offset : offset + param.numel()].view(param.shape).float()

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
