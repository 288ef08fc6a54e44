"""Several processes on one job: who does which shard, their devices, waiting for each other.

    torchrun --nproc_per_node 8 -m tipcli rollout --student S --prompts P -o runs/rollout
    accelerate launch --multi_gpu --num_processes 8 -m tipcli score runs/rollout ...
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HEAD:29500 -m tipcli distill ...

Under a launcher (``WORLD_SIZE`` > 1) the processes share out a stage's shards by index
(process r takes shards r, r + W, r + 2W, ...): a shard's content and its random seeds
depend only on its index, so the output does not depend on the number of processes.
Each process runs on its own device (``cuda:LOCAL_RANK``, or the CPU); the main process
writes the manifest once every shard is done. Before anything is written every process
compares a digest of its resolved settings with the main process's (``Processes.agree``):
nodes launched with other flags are refused, on every process, naming what differs.
accelerate's ``PartialState`` sets up torch.distributed (NCCL on GPUs, gloo on CPUs),
with ``--dist-timeout`` as the process group's timeout: how long one process waits for
the others at a barrier.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world: int = 1
    device: str | None = None  # this process's device under a launcher
    local_rank: int = 0

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
        from tipcli.models.loading import resolve_device

        return resolve_device(device)

    def barrier(self) -> None:
        if self.world > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every process, by rank, on every process (one process: ``[obj]``).
        For small results the processes computed themselves (never a user's file)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def agree(self, settings: dict[str, Any]) -> None:
        """Refuse, on every process, a launch whose processes resolved other settings than
        the main one (a node started with other flags or another settings file): their
        digests are compared, and the settings that differ named with both values. Every
        process must call it, before anything is written."""
        digests = self.gather(settings_digest(settings))
        odd = next((r for r, d in enumerate(digests) if d != digests[0]), None)
        if odd is None:
            return
        every = self.gather(settings)  # every process saw the same digests: all call this
        from tipcli.errors import TipError

        raise TipError(f"process {odd} of this launch resolved other settings than process "
                       f"0: {differences(every[0], every[odd], odd)}; start every process "
                       "(each node) with the same flags and settings file")


def settings_digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def differences(main: dict[str, Any], other: dict[str, Any], rank: int) -> str:
    """``--seed 0 on process 0, 1 on process 1`` for each setting that differs."""
    def shown(config: dict[str, Any], key: str) -> str:
        text = json.dumps(config[key], sort_keys=True, default=str) if key in config \
            else "unset"
        return text if len(text) <= 60 else text[:57] + "..."

    keys = [k for k in dict.fromkeys((*main, *other)) if shown(main, k) != shown(other, k)]
    return "; ".join(f"--{k.replace('_', '-')} {shown(main, k)} on process 0, "
                     f"{shown(other, k)} on process {rank}" for k in keys)


def processes(device: str = "auto", timeout_minutes: float | None = None) -> Processes:
    """This process's place among the launched ones (one process without a launcher). The
    first call starts the process group, with ``timeout_minutes`` as its timeout."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes()
    import torch
    from accelerate import PartialState

    kwargs = {"timeout": timedelta(minutes=timeout_minutes)} if timeout_minutes else {}
    state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available(), **kwargs)
    return Processes(state.process_index, state.num_processes, str(state.device),
                     state.local_process_index)


def visible_device(local_rank: int, visible: str | None = None) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` one process should see: the ``local_rank``-th entry of
    the list the job was given (Slurm and Kubernetes give e.g. ``4,5,6,7``), or the
    ``local_rank``-th device when no list is set."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    entries = [e.strip() for e in (visible or "").split(",") if e.strip()]
    if not entries:
        return str(local_rank)
    if local_rank >= len(entries):
        from tipcli.errors import TipError

        raise TipError(f"process {local_rank} of this node has no GPU: CUDA_VISIBLE_DEVICES="
                       f"{visible} lists {len(entries)}; launch at most {len(entries)} "
                       "processes per node")
    return entries[local_rank]
