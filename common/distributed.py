"""One process or many: torch.distributed set-up from torchrun's (or SLURM's) environment, and small helpers."""
from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from common.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` picks this process's GPU when CUDA is present, else the CPU; `cpu`, `cuda`, `cuda:N` as given."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


def launched_world_size() -> int:
    """The number of processes torchrun started this one among (its WORLD_SIZE); 1 when started without it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device_name: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set), with NCCL on GPUs and gloo on CPU."""
    world_size = launched_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = datetime.timedelta(minutes=30)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout,
                                **_restart_store(rank, world_size, timeout))
    return DistInfo(rank, world_size, local_rank, device)


def _restart_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dict:
    """After torchrun restarted its workers, a store namespace of this attempt's own; {} otherwise.

    The static rendezvous keeps one store for every attempt with the same key names, so a restarted rank could read
    a dead rank's gloo address ("connectFullMesh ... Connection refused"); prefixing the restart count avoids that."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False, timeout=timeout)
    return {"store": dist.PrefixStore(f"attempt-{restart}", store), "rank": rank, "world_size": world_size}


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True when `flag` is true on any rank, so every rank takes the same branch (stop, skip, ...)."""
    return flag if not info.distributed else bool(all_reduce_sum(torch.tensor([int(flag)], device=info.device), info))


class RankVote:
    """Whether any rank raised a flag, asked every step without waiting for it: each call starts a sum over the ranks
    on a CPU (gloo) group of its own and returns the one the call before started, so every rank gets the same answer
    one call later. Alone, a process gets its own flag back at once. Every rank must call `vote` equally often."""

    def __init__(self, info: DistInfo) -> None:
        self._group = dist.new_group(backend="gloo") if info.distributed else None
        self._pending: tuple[dist.Work, torch.Tensor] | None = None

    def vote(self, flag: bool) -> bool:
        if self._group is None:
            return flag
        raised = self.result()
        tensor = torch.tensor([int(flag)])
        self._pending = dist.all_reduce(tensor, group=self._group, async_op=True), tensor
        return raised

    def result(self) -> bool:
        """The answer to the last vote started (False if none), waiting for it; no vote stays pending."""
        if self._pending is None:
            return False
        work, tensor = self._pending
        self._pending = None
        work.wait()
        return bool(tensor.item())


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The sum of `tensor` over all ranks (the tensor itself when not distributed)."""
    if info.distributed:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def barrier(info: DistInfo) -> None:
    """Wait until every rank gets here (nothing when not distributed)."""
    if info.distributed:
        dist.barrier()


def average_buffers(model: torch.nn.Module, info: DistInfo) -> None:
    """Replace every floating-point buffer (BatchNorm's running statistics) by its mean over the ranks."""
    if not info.distributed:
        return
    for buffer in model.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer /= info.world_size


def all_gather_objects(obj, info: DistInfo) -> list:
    """Every rank's `obj`, in rank order (a one-element list when not distributed)."""
    if not info.distributed:
        return [obj]
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def checked_on_main(check: Callable[[], None], info: DistInfo) -> None:
    """Run `check` on rank 0 only (one that claims a file for it, say); the UserError it raises is raised on every
    rank, so that all of them stop with the same line."""
    refusal = None
    if info.is_main:
        try:
            check()
        except UserError as error:
            refusal = str(error)
    refusal = all_gather_objects(refusal, info)[0]
    if refusal:
        raise UserError(refusal)
