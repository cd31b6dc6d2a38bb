"""torch.distributed for the trainer: one device per rank, DDP or FSDP2 around the CoconutModel (DDP's
all-reduce only on a step's last micro-batch), full state gathered for evaluation and checkpoints.

Both wrappers average gradients over the ranks; the trainer wants their sum (each rank's loss is
already divided by the label count of the whole global batch), so it multiplies each rank's loss
by `gradient_scale()`.

FSDP2 makes each decoder block its own `fully_shard` unit, then the CoconutModel the root unit (the
embeddings, final norm, LM head and thought transform), so that at most a block or two are whole
at a time. FSDP2 all-gathers a block's parameters at every *call* of its forward, and in the
backward again for every call whose output gets a gradient; a Coconut forward calls each block
1 + thoughts times (two_pass: + 1, its full forward), and each rank's share of a batch has its own
longest thought chain. So that every rank issues the same collectives, the trainer agrees the number
of thought steps of each micro-batch with one all-reduce(MAX) per optimizer step
(`agreed_thought_steps`) and the forward runs that many (`CoconutModel.forward(thought_steps=...)`): a rank whose chains are done runs steps
without rows, which call every block all the same, and the last step's output, which nothing
reads, gets a zero gradient so its backward runs (it would otherwise read freed parameters).
Autograd accumulates a parameter's gradient once, after every call's backward, so each block still
reduce-scatters once per micro-batch (also under gradient accumulation: `gradient_sync`). Deferred
weight gradients (`linear.py`) and the paged training cache work unchanged on the gathered
parameters; the forward modes are paged and two_pass (the no-cache references do not take
`thought_steps`). A learned thought transform's parameters belong to the root unit; evaluation and
checkpoints gather them with the decoder's.

Blocks are resharded after each forward call (`reshard_after_forward=True`): memory is a shard of
everything plus the block in use, whatever the thought count, at the price of an all-gather per
block per call, forward and backward, i.e. 2 (thoughts + 2) per block per micro-batch. Kept whole
(`False`) they would cost one all-gather per block in the forward but hold the whole model from the
first block to the backward, as one unit would. The root stays whole through the forward: its
parameters are used by every step and again first thing in the backward.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from torch import nn

from .errors import CoconutEngineError

PARALLEL_MODES = ("ddp", "fsdp")


class DistributedError(CoconutEngineError, RuntimeError):
    """The torchrun environment or the parallel setting cannot be used as given."""


@dataclass
class DistEnv:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> "DistEnv":
        """Read RANK, WORLD_SIZE and LOCAL_RANK (set by torchrun); a clear error if one is not an integer."""
        values = {}
        for key, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
            raw = os.environ.get(key, str(default))
            try:
                values[key] = int(raw)
            except ValueError:
                raise DistributedError(f"environment variable {key}={raw!r} is not an integer") from None
        env = cls(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])
        if not 0 <= env.rank < env.world_size:
            raise DistributedError(f"environment: RANK={env.rank} is outside WORLD_SIZE={env.world_size}")
        return env

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def start(self, requested_device: str | None) -> torch.device:
        """Pick this rank's device and join the process group; returns the device.

        On CUDA the rank's GPU (`cuda:LOCAL_RANK` unless a device is given) is made current with
        `torch.cuda.set_device` before anything else touches CUDA, so default-device tensors and
        kernel launches land on it and not on GPU 0.
        """
        if requested_device is not None:
            device = torch.device(requested_device)
        else:
            device = torch.device(f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda":
            if device.index is None:
                device = torch.device("cuda", self.local_rank)
            if device.index >= torch.cuda.device_count():
                raise DistributedError(f"device {device} (LOCAL_RANK={self.local_rank}) does not exist: "
                                       f"{torch.cuda.device_count()} CUDA device(s) visible")
            torch.cuda.set_device(device)
        if self.distributed and not torch.distributed.is_initialized():
            if device.type == "cuda":
                torch.distributed.init_process_group("nccl", device_id=device)
            else:
                torch.distributed.init_process_group("gloo")
        return device

    def barrier(self) -> None:
        """Wait for every rank (nothing without torchrun)."""
        if self.distributed:
            torch.distributed.barrier()

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place."""
        if self.distributed:
            torch.distributed.all_reduce(tensor)
        return tensor

    def max_(self, tensor: torch.Tensor) -> torch.Tensor:
        """The maximum of `tensor` over the ranks, in place."""
        if self.distributed:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return tensor

    def gather(self, value) -> list:
        """Every rank's `value` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [value]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, value)
        return out

    def gradient_scale(self) -> int:
        """What each rank's loss is multiplied by so that the wrappers' gradient average is the sum."""
        return self.world_size


def wrap_for_training(model: nn.Module, parallel: str, env: DistEnv, device: torch.device,
                      bf16: bool = False) -> nn.Module:
    """`model` (a CoconutModel; every rank holds rank 0's weights afterwards) under DDP or FSDP2; itself
    on one process.

    DDP: bucketed all-reduce overlapped with the backward, parameters broadcast from rank 0 at
    construction. FSDP2: one `fully_shard` unit per decoder block, then the root (see the module
    docstring), parameters sharded from rank 0's values; with `bf16`, bf16 parameters for the
    compute and fp32 gradient reduction (`MixedPrecisionPolicy`).
    """
    if parallel not in PARALLEL_MODES:
        raise DistributedError(f"parallel {parallel!r} is not one of {PARALLEL_MODES}")
    if not env.distributed:
        return model
    if parallel == "ddp":
        # a learned thought transform gets no gradient from a batch without thoughts (stage 0)
        transform = getattr(model, "thought_transform", None)
        unused = transform is not None and any(p.requires_grad for p in transform.parameters())
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True, find_unused_parameters=unused)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    for p in model.parameters():  # fully_shard keeps each rank's own values: start from rank 0's
        torch.distributed.broadcast(p.data, src=0)
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
              else MixedPrecisionPolicy())
    for block in model.decoder.layers:
        fully_shard(block, mp_policy=policy, reshard_after_forward=True)
    return fully_shard(model, mp_policy=policy, reshard_after_forward=False)


def agreed_thought_steps(micro_batches: list[list], env: DistEnv, device: torch.device) -> list[int]:
    """Per micro-batch, the longest thought chain on any rank (one all-reduce for all of them; every
    rank passes as many micro-batches): the `thought_steps` that make each rank call every block
    equally often under FSDP2."""
    longest = torch.tensor([max(s.num_thoughts for s in micro) for micro in micro_batches], device=device)
    return [int(n) for n in env.max_(longest).tolist()]


def gradient_sync(wrapped: nn.Module, enabled: bool):
    """A context for one micro-batch's forward and backward: under DDP gradients are all-reduced only
    when `enabled` (the step's last micro-batch), the others accumulate locally. FSDP2 reduce-scatters
    every micro-batch: its gradients stay sharded (skipping the reduction would keep each block's
    whole gradient on every rank until the step's last micro-batch, the memory FSDP is there to save)."""
    if not enabled and isinstance(wrapped, nn.parallel.DistributedDataParallel):
        return wrapped.no_sync()
    return contextlib.nullcontext()


def leave_process_group() -> None:
    """Destroy the process group, if any, after freeing what still holds it (FSDP2's modules and DTensors
    sit in reference cycles): its threads are joined while Python still runs. Left to interpreter exit,
    a collective's clean-up on gloo's thread can need the GIL after it is gone and abort the process
    (torchrun then reports a finished run as failed: SIGABRT)."""
    import gc

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gc.collect()
        torch.distributed.destroy_process_group()


def is_fsdp(module: nn.Module) -> bool:
    """Whether `module` was given to FSDP2's `fully_shard`."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def full_state_dict(wrapped: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's parameters and buffers (full, unsharded tensors) on every rank: FSDP2 gathers
    its shards in their stored dtype (fp32 masters under bf16 mixed precision). Collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True))


def gathered_optimizer_state(wrapped: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's full state in `optimizer.state_dict()`'s own layout (parameters numbered in the
    model's order), gathered from FSDP2's shards: the same file as a DDP or single-process run
    writes, so any rank count and either wrapper resumes from it. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    by_name = get_optimizer_state_dict(wrapped, optimizer, options=StateDictOptions(full_state_dict=True))
    index = {name: i for i, (name, _) in enumerate(wrapped.named_parameters())}
    state = {index[name]: values for name, values in by_name["state"].items()}
    groups = [{**group, "params": [index[name] for name in group["params"]]} for group in by_name["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_gathered_optimizer_state(wrapped: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Give an FSDP2-wrapped model's optimizer the state of `gathered_optimizer_state` (or of a DDP /
    single-process checkpoint): each rank keeps its shard. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = [name for name, _ in wrapped.named_parameters()]
    try:
        by_name = {"state": {names[i]: values for i, values in state["state"].items()},
                   "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                    for group in state["param_groups"]]}
    except (KeyError, IndexError, TypeError) as exc:
        raise DistributedError(f"optimizer state does not match the model's {len(names)} parameters ({exc!r})") from None
    set_optimizer_state_dict(wrapped, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


class StateDictView:
    """Something `checkpoint.save_checkpoint` can call `state_dict()` on: an already gathered state."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state
