"""One process or several: DistributedDataParallel under ``torchrun``, NCCL on GPUs and gloo on
CPUs (which is how the 2-process test runs here).

``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; without them this is a single
process and nothing is initialised.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ran.devices import pick_device


@dataclass(frozen=True)
class Context:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(requested_device: str) -> Context:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if world == 1:
        return Context(0, 1, device)
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Context(dist.get_rank(), world, device)


def teardown(context: Context) -> None:
    if context.world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def barrier(context: Context) -> None:
    if context.world > 1:
        import torch.distributed as dist

        dist.barrier()
