"""torch.distributed for the trainer: one device per rank, DDP or FSDP2 around the CoconutModel,
gradient sync only on a step's last micro-batch, full state gathered for evaluation and checkpoints.

Both wrappers average gradients over the ranks; the trainer wants their sum (each rank's loss is
already divided by the label count of the whole global batch), so it multiplies each rank's loss
by `gradient_scale()`.

FSDP2 shards the whole CoconutModel as one unit (`fully_shard(model)`), not one unit per decoder
block: FSDP2 all-gathers a unit's parameters at every *call* of its forward and registers a
reduce-scatter per call, and a Coconut training forward calls every block 1 + thoughts (+ 1) times,
with a number of thought steps that differs between ranks (each rank's share has its own longest
thought chain). Per-block units therefore issue different numbers of collectives on different
ranks: a 2-rank gloo run hangs (one micro-batch) or aborts with a collective size mismatch (two).
With one unit there is one all-gather per micro-batch forward and one reduce-scatter per optimizer
step on every rank, whatever the thoughts; parameters are whole during a micro-batch, gradients and
optimizer state stay sharded.
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
    """`model` (every rank holds rank 0's weights afterwards) under DDP or FSDP2; itself on one process.

    DDP: bucketed all-reduce overlapped with the backward, parameters broadcast from rank 0 at
    construction. FSDP2: one `fully_shard` unit over the whole model (see the module docstring),
    parameters sharded from rank 0's values, bf16 compute with fp32 gradient reduction when `bf16`.
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
    return fully_shard(model, mp_policy=policy)


def gradient_sync(wrapped: nn.Module, enabled: bool):
    """A context for one micro-batch's forward and backward: gradients are reduced across ranks only
    when `enabled` (the step's last micro-batch); the others accumulate locally."""
    if enabled:
        return contextlib.nullcontext()
    if isinstance(wrapped, nn.parallel.DistributedDataParallel):
        return wrapped.no_sync()
    if is_fsdp(wrapped):
        return _fsdp_no_sync(wrapped)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(wrapped: nn.Module):
    wrapped.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        wrapped.set_requires_gradient_sync(True)


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
