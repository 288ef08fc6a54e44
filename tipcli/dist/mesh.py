"""The device mesh FSDP2 shards over, the units a transformers model is sharded into, and
loading a model sharded on the meta device from its safetensors; shared by training
(``tipcli.dist.fsdp``) and the sharded teacher (``tipcli.models.teacher``).
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


def load_sharded_weights(module: torch.nn.Module, files: dict[str, str], device) -> None:
    """Give a module sharded on the meta device its parameters: each process reads only
    its own rows of every tensor from the checkpoint's safetensors ``files`` (tensor name
    -> file), so no process ever holds the whole model. ``module`` is a model, or a
    ``DistillModule`` (its student's names carry ``student.``); its buffers (rotary
    frequencies) were built real and are kept."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from tipcli.errors import TipError

    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
    module.to_empty(device=device)
    with torch.no_grad():
        for name, b in module.named_buffers():
            b.copy_(buffers[name])
        opened: dict[str, object] = {}
        for name, param in module.named_parameters():
            key = name.removeprefix("student.")
            path = files.get(key)
            if path is None:
                raise TipError(f"the checkpoint holds no tensor {key}; it does not match its "
                               "config.json")
            reader = opened.get(path) or opened.setdefault(path, safe_open(path, "pt"))
            local = param.to_local() if isinstance(param, DTensor) else param
            if isinstance(param, DTensor):
                shape, offset = compute_local_shape_and_global_offset(
                    param.shape, param.device_mesh, param.placements)
            else:
                shape, offset = tuple(param.shape), (0,) * param.dim()
            rows = reader.get_slice(key)[offset[0]:offset[0] + shape[0]] if param.dim() \
                else reader.get_tensor(key)
            local.copy_(rows)  # cast as it is copied: no converted copy of the rows
