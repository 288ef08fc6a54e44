"""Several processes on one stage: who does which shard, and waiting for each other.

    torchrun --nproc_per_node 8 -m tipcli rollout --student S --prompts P -o runs/rollout
    accelerate launch --multi_gpu --num_processes 8 -m tipcli score runs/rollout ...

Under a launcher (``WORLD_SIZE`` > 1) the processes share out a stage's shards by index
(process r takes shards r, r + W, r + 2W, ...): a shard's content and its random seeds
depend only on its index, so the output does not depend on the number of processes.
Each process runs on its own device (``cuda:LOCAL_RANK``, or the CPU); the main process
writes the manifest once every shard is done. accelerate's ``PartialState`` sets up
torch.distributed (NCCL on GPUs, gloo on CPUs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world: int = 1
    device: str | None = None  # this process's device under a launcher

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mine(self, indices: range | list[int]) -> list[int]:
        """The shard indices this process works on."""
        return [i for i in indices if i % self.world == self.rank]

    def device_for(self, device: str) -> str:
        """Where this process runs a model asked for on ``device``: under a launcher,
        ``auto`` is the process's own device; else the device itself, checked."""
        if self.world > 1 and device == "auto" and self.device:
            return self.device
        from tipcli.models import resolve_device

        return resolve_device(device)

    def barrier(self) -> None:
        if self.world > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()


def processes(device: str = "auto") -> Processes:
    """This process's place among the launched ones (one process without a launcher)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes()
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
    return Processes(state.process_index, state.num_processes, str(state.device))
