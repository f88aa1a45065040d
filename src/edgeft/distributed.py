"""DistributedDataParallel under torchrun: who this process is, and the few collective steps the
fit loop needs. With no torchrun around, a single process that does nothing special."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from edgeft.errors import InputError

__all__ = ["Dist", "check_nproc", "init_distributed"]


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    launched: bool = False  # under torchrun: a process group exists (also with one process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, *values: torch.Tensor) -> list[torch.Tensor]:
        """The element-wise sums of `values` over all ranks (one collective for all of them)."""
        if self.world == 1:
            return list(values)
        packed = torch.stack([v.double() for v in values])
        dist.all_reduce(packed)
        return list(packed.unbind())

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """DDP around `model` for the parameters that train now (rebuilt when that set changes)."""
        if not self.launched:
            return model
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def sync_buffers(self, model: nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics): DDP broadcasts them at the
        start of a forward, so after the last training step each rank still holds its own."""
        if self.world > 1:
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)

    def identical(self, model: nn.Module) -> bool:
        """Whether every rank holds exactly the same weights and buffers."""
        if self.world == 1:
            return True
        flat = torch.cat([t.detach().double().flatten() for t in model.state_dict().values()])
        weights = torch.arange(len(flat), device=flat.device, dtype=torch.float64) % 7 + 1  # catches swapped values
        local = torch.stack([flat.sum(), (flat * flat).sum(), (flat * weights).sum()])
        gathered = [torch.zeros_like(local) for _ in range(self.world)]
        dist.all_gather(gathered, local)
        return all(torch.equal(g, gathered[0]) for g in gathered)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.launched and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK; also a single
    process); each rank gets its own GPU (cuda:LOCAL_RANK, NCCL) or shares the CPU (gloo)."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return Dist(), device
    ctx = Dist(
        rank=int(os.environ["RANK"]),
        world=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        launched=True,
    )
    _end_with_the_launcher()
    if device.type == "cuda":
        if ctx.local_rank >= torch.cuda.device_count():
            raise InputError(f"LOCAL_RANK {ctx.local_rank} but only {torch.cuda.device_count()} CUDA device(s) here")
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return ctx, device


def _end_with_the_launcher() -> None:
    """torchrun starts each rank in a session of its own, so a launcher killed outright (SIGKILL,
    the OOM killer) would leave its ranks training on, writing the run folder that a `--resume`
    then reads. On Linux the kernel kills this rank when its launcher dies (PR_SET_PDEATHSIG);
    a rank whose launcher is already gone stops here. Only under torchrun's agent: a rank started
    by hand from a shell must not end with that shell."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return
    launcher = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != launcher:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


def check_nproc(nproc: int, device: str) -> None:
    """Refuse more torchrun processes than this machine has devices for: one per GPU on CUDA,
    at most one per core on the CPU."""
    gpus = torch.cuda.device_count() if device != "cpu" else 0
    cores = os.cpu_count() or 1
    limit, devices = (gpus, f"{gpus} CUDA device(s)") if gpus else (cores, f"{cores} CPU cores and no GPU in use")
    if nproc > limit:
        raise InputError(
            f"--nproc {nproc}: this machine has {devices}, so at most --nproc {limit} "
            "(more processes would share them and only slow each other)"
        )
