"""Single- or multi-process training (DDP under torchrun): which process this is and on which device."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..placement import resolve_device


@dataclass
class Dist:
    """The process's rank among ``world`` training processes (torchrun's variables; 0 of 1 without it)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def init_distributed(device: str) -> tuple[Dist, torch.device]:
    """This process's place in the run and its device: one process, or torchrun's ``WORLD_SIZE``/``RANK``/
    ``LOCAL_RANK`` (NCCL on CUDA, gloo on the CPU; the process group is started here). ``device`` is
    ``--device``: ``ValueError`` naming it when it is misspelt or not there."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = str(resolve_device(device, "--device"))  # checked: a clear error when the GPU asked for is not there
    if world <= 1:
        return Dist(), torch.device(device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        backend = "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend)
    return Dist(rank=rank, world=world, local_rank=local), dev
