"""The device mesh FSDP2 shards over, and the units a transformers model is sharded into;
shared by training (``tipcli.train.fsdp``) and the sharded teacher (``tipcli.sharded``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


def make_mesh(device: torch.device, world: int) -> tuple[DeviceMesh, bool]:
    """A 1-D mesh over the ``world`` processes on ``device``'s type, and whether a process
    group was started for it (a single process has none yet; ``end_group`` ends it)."""
    started = False
    if not dist.is_initialized():
        if world != 1:
            raise RuntimeError("several processes but no process group")
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        started = True
    return init_device_mesh(device.type, (world,)), started


def end_group(started: bool) -> None:
    if started and dist.is_initialized():
        dist.destroy_process_group()


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers model: the outermost modules whose class is
    one of its ``_no_split_modules``, else ``model.model.layers``; [] when neither."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found: list[tuple[str, torch.nn.Module]] = []
    for name, module in model.named_modules():
        if type(module).__name__ in names and \
                not any(name.startswith(outer + ".") for outer, _ in found):
            found.append((name, module))
    if found:
        return [m for _, m in found]
    layers = getattr(getattr(model, "model", None), "layers", None)
    return list(layers) if isinstance(layers, torch.nn.ModuleList) else []
