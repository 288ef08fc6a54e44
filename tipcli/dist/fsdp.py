"""FSDP2 for ``tip train --fsdp``: the device mesh, sharding the student, full state dicts.

tip applies ``torch.distributed.fsdp.fully_shard`` itself: each decoder layer of the
student becomes one unit, then the whole ``DistillModule`` (embeddings, final norm, LM
head) the root unit, on a 1-D mesh over the processes. accelerate (or torchrun) starts the
processes and their group (gloo on CPU, NCCL on GPU); accelerate's own FSDP plugin is not
used, since it refuses to run without an accelerator. Each process then holds a
1/processes share of the parameters, their gradients and AdamW's state; a layer's full
parameters exist only while it runs.

- Gradients: FSDP2 reduce-scatters them as a mean over processes, as DDP all-reduces them,
  so the step's loss scale (``loop.train_step``) is the same for both.
- Clipping: the norm of the sharded gradients is combined across processes
  (``clip_grad_norm``), so it is the global norm.
- State: ``full_state`` gathers whole (unsharded) CPU state dicts onto the main process,
  keyed by parameter names; ``load_full_state`` loads those into the shards, the main
  process broadcasting each tensor.
- bf16 on GPU: parameters are cast for forward and backward, gradients reduced in float32.
- LoRA (``--lora-r``): the frozen base is sharded with the adapters (FSDP2 shards each
  parameter on its own, so frozen and trained ones share a unit); only the adapters get
  gradients and AdamW state, and checkpoints hold the adapters alone (``frozen=False``).

One process gets a mesh of one (a process group on an in-process store), so
``--fsdp`` works, without benefit, in a single process too.
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from tipcli.dist.mesh import decoder_layers

GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole, on rank 0, CPU
SCATTER = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)


def shard(module: torch.nn.Module, mesh: DeviceMesh, bf16: bool) -> int:
    """Shard ``module`` (a ``DistillModule``) in place: each decoder layer of its student,
    then the root. Returns the number of layers. With ``bf16`` the parameters are cast to
    bfloat16 for compute and gradients reduced in float32; the root does not cast its
    inputs (the loss targets stay float32)."""
    kw = {}
    if bf16:
        kw = {"param_dtype": torch.bfloat16, "reduce_dtype": torch.float32}
    layers = decoder_layers(module.student)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=MixedPrecisionPolicy(**kw))
    fully_shard(module, mesh=mesh,
                mp_policy=MixedPrecisionPolicy(**kw, cast_forward_inputs=False))
    return len(layers)


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Clip sharded gradients by their global norm (over every process's shards); returns
    that norm, before clipping, as a plain tensor."""
    params = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def full_model_state(module) -> dict:
    """The model's whole CPU state dict on the main process, {} on the others; every
    process must call it."""
    return get_model_state_dict(module, options=GATHER)


def whole_copy(sharded, module, lora=None):
    """A new, unsharded model of ``sharded``'s class holding its whole parameters (gathered
    from every process's shards), on every process; ``module`` is the sharded root whose
    state dict names them ``student.*``. With ``lora`` (the peft config of its adapters)
    the copy gets the same adapters, and the peft model around it is returned too:
    (copy, peft model or None). Every process must call it."""
    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
    cls = next(c for c in type(sharded).__mro__ if not issubclass(c, FSDPModule))
    device = next(iter(state.values())).device
    copy, peft = cls(sharded.config).to(device), None
    if lora is not None:
        import copy as copying

        from peft import get_peft_model

        peft = get_peft_model(copy, copying.deepcopy(lora))
    copy.load_state_dict({k.removeprefix("student."): v for k, v in state.items()})
    return copy.eval(), peft


def adapter_state(module) -> dict:
    """The trained parameters (a LoRA student's adapters) as a whole CPU state dict on the
    main process, {} on the others, named as in the student; every process must call it."""
    state = get_model_state_dict(module, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
    return {k.removeprefix("student."): v for k, v in state.items()}


def full_state(module, optimizer) -> tuple[dict, dict]:
    """Whole CPU state dicts of the model and AdamW (keyed by parameter name) on the main
    process, empty dicts on the others; every process must call it."""
    return full_model_state(module), get_optimizer_state_dict(module, optimizer, options=GATHER)


FLAT = StateDictOptions(flatten_optimizer_state_dict=True)  # sharded, names flat


def save_sharded(module, optimizer, path, weights: bool = True, frozen: bool = True) -> dict:
    """Every process writes its own shards of the model's and AdamW's tensors into
    ``path`` with torch.distributed.checkpoint's safetensors storage (one file per
    process; where each shard lies is JSON in the files' headers, no pickle); without
    ``weights`` AdamW's alone, without ``frozen`` the trained weights only (a LoRA
    student's adapters). Returns what is not a tensor (AdamW's hyper-parameters), for the
    caller to keep as JSON. Every process must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    tensors, rest = _sharded_state(module, optimizer, weights, frozen)
    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(path), save_distributed=True))
    return rest


def load_sharded(module, optimizer, path, rest: dict, weights: bool = True,
                 frozen: bool = True) -> None:
    """Load what ``save_sharded`` wrote, on any number of processes: each reads the pieces
    of the saved shards that make up its own (torch.distributed.checkpoint reshards).
    ``rest`` is what it returned. Every process must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    tensors, _ = _sharded_state(module, optimizer, weights, frozen)  # as this launch shards
    dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(path)))
    if weights:
        set_model_state_dict(module, {k.removeprefix("model."): v
                                      for k, v in tensors.items() if k.startswith("model.")},
                             options=StateDictOptions(strict=frozen))
    optim = {k.removeprefix("optim."): v for k, v in tensors.items() if k.startswith("optim.")}
    set_optimizer_state_dict(module, optimizer, {**optim, **rest}, options=FLAT)


def _sharded_state(module, optimizer, weights: bool = True,
                   frozen: bool = True) -> tuple[dict, dict]:
    """(the model's and AdamW's tensors as this process's shards, named ``model.*`` and
    ``optim.*``, the model's frozen ones only with ``frozen``; AdamW's other entries).
    Reading the optimizer's state creates it when a first step has not yet (a resumed
    run)."""
    own = StateDictOptions(ignore_frozen_params=not frozen)
    tensors = {f"model.{k}": v for k, v in get_model_state_dict(module, options=own).items()} \
        if weights else {}
    rest = {}
    for k, v in get_optimizer_state_dict(module, optimizer, options=FLAT).items():
        if torch.is_tensor(v):
            tensors[f"optim.{k}"] = v
        else:
            rest[k] = v
    return tensors, rest


def save_whole(module, out, main: bool, max_shard_bytes: int = 5 << 30) -> None:
    """The student's weights as a save_pretrained checkpoint (``model.safetensors``, or
    ``model-0000i-of-0000N.safetensors`` files and their index), gathered one tensor at a
    time and written a file at a time by the main process: no process ever holds more
    than one file's worth of whole tensors. Every process must call it."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    seen, named = set(), []
    for name, t in module.state_dict(keep_vars=True).items():  # tied ones once, as HF does
        key = id(t)
        if key not in seen:
            seen.add(key)
            named.append((name.removeprefix("student."), t))
    files, size = [[]], 0
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if files[-1] and size + nbytes > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append((name, t))
        size += nbytes
    weight_map = {}
    for i, group in enumerate(files, 1):
        whole = {name: (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()
                 .contiguous() for name, t in group}
        fname = "model.safetensors" if len(files) == 1 else \
            f"model-{i:05d}-of-{len(files):05d}.safetensors"
        if main:
            save_file(whole, str(Path(out) / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(whole, fname))
        del whole
    if main and len(files) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for _, t in named)},
                 "weight_map": weight_map}
        (Path(out) / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def load_full_state(module, optimizer, model_sd: dict, optim_sd: dict) -> None:
    """Load whole state dicts (given on the main process; the others pass empty dicts)
    into every process's shards; every process must call it."""
    set_model_state_dict(module, model_sd, options=SCATTER)
    set_optimizer_state_dict(module, optimizer, optim_sd, options=SCATTER)


def local_numel(module, optimizer) -> dict[str, int]:
    """Elements this process holds: its parameter shards, and its AdamW state (moment
    shards and step counters)."""
    def local(t: torch.Tensor) -> int:
        return t.to_local().numel() if isinstance(t, DTensor) else t.numel()

    return {"parameters": sum(local(p) for p in module.parameters()),
            "optimizer_state": sum(local(v) for s in optimizer.state.values()
                                   for v in s.values() if torch.is_tensor(v))}
