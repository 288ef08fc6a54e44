"""A teacher sharded over the processes with FSDP2, for inference only (``--shard-teacher``).

    torchrun --nproc_per_node 8 -m tipcli score runs/rollout --teacher T --shard-teacher ...

Each process holds about 1/N of the teacher's parameters, in the model's dtype (no
gradients, no optimizer state); all N compute at once, each on its own data. Loaded by
name (``load_teacher``), the teacher is built on the meta device, sharded, and each
process reads only its own rows of every tensor from the checkpoint's safetensors: no
process ever holds it whole. A module's
whole parameters exist only while it runs: each decoder layer is an FSDP2 unit gathered
for its forward; the input embeddings and an untied LM head are units of their own; the
rest (the final norm; embeddings and head when they are tied) is the root unit.

FSDP2 gathers with collectives, so every process must run the same sequence of them:
``hidden`` (the body's forward) and ``gathered_head`` (the head's weights, for one batch's
chunks of logits) are called the same number of times on every process. A process with
fewer batches than another runs ``idle`` batches (a one-token forward) to keep in step;
the callers count batches from the shards' sizes, which every process knows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.distributed.fsdp import FSDPModule, fully_shard

from tipcli.dist.mesh import decoder_layers, end_group, load_shards, make_mesh
from tipcli.models.loading import empty_model, input_device, load_model
from tipcli.ops.forward import body_hidden


class _Body(torch.nn.Module):
    """The teacher's transformer body as one module, so its forward is the root's."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids_BT, attention_mask_BT):
        return body_hidden(self.model, input_ids_BT, attention_mask_BT)


class ShardedTeacher:
    """``model`` sharded in place over ``world`` processes on ``device`` (its type); a
    model on the meta device is sharded there, for ``load_shards`` to fill."""

    def __init__(self, model, device: torch.device, world: int):
        model.requires_grad_(False)
        model.eval()
        self.model, self.device = model, device
        self.mesh, self.own_group = make_mesh(device, world)
        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
        self.tied = head.weight is embed.weight
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=self.mesh)
        if not self.tied:
            fully_shard(embed, mesh=self.mesh)
            fully_shard(head, mesh=self.mesh)
        self.body = _Body(model)
        # tied: embeddings and head are the root's and stay gathered until the batch ends
        fully_shard(self.body, mesh=self.mesh, reshard_after_forward=not self.tied)
        self.head = head

    def hidden(self, input_ids_BT, attention_mask_BT) -> torch.Tensor:
        """Final hidden states [B, T, H] (a collective step)."""
        with torch.no_grad():
            return self.body(input_ids_BT.to(self.device), attention_mask_BT.to(self.device))

    @contextlib.contextmanager
    def gathered_head(self) -> Iterator[None]:
        """The LM head's whole weight while the block runs (a collective step): one batch's
        chunks of logits (``forward.head_logits(teacher.model, ...)``)."""
        if not self.tied:
            self.head.unshard()
        try:
            yield
        finally:
            if self.tied:
                self.body.reshard()
            else:
                self.head.reshard()

    def idle(self, device) -> None:
        """The collective steps of one batch, on a one-token input: for a process that has
        run out of batches while others have not."""
        one = torch.ones(1, 1, dtype=torch.long, device=device)
        self.hidden(one, one)
        with self.gathered_head():
            pass

    def close(self) -> None:
        end_group(self.own_group)
        self.own_group = False


class WholeTeacher:
    """The teacher as one process holds it (on one device, or spread by accelerate): the
    same calls as ``ShardedTeacher``, with nothing to gather."""

    def __init__(self, model):
        model.requires_grad_(False)
        self.model = model
        self.device = input_device(model)

    def hidden(self, input_ids_BT, attention_mask_BT) -> torch.Tensor:
        with torch.no_grad():
            return body_hidden(self.model, input_ids_BT.to(self.device),
                               attention_mask_BT.to(self.device))

    def gathered_head(self):
        return contextlib.nullcontext()

    def idle(self, device) -> None:
        pass

    def close(self) -> None:
        pass


def load_teacher(name: str, device, dtype, rt, procs) -> ShardedTeacher | WholeTeacher:
    """The teacher ``name`` as the runtime settings ``rt`` ask: sharded over the launched
    processes from the meta device (``--shard-teacher``; each process reads only its own
    rows), or loaded whole (on ``device``, or spread with ``--device-map``). A checkpoint
    without safetensors is loaded whole first, then sharded."""
    if rt.shard_teacher:
        model, files = empty_model(name, rt.trust_remote_code)
        if files is not None:
            model.to(dtype)  # on the meta device: no memory
            teacher = ShardedTeacher(model, torch.device(device), procs.world)
            load_shards(model, files, device)
            return teacher
    return teacher_for(load_model(name, device, dtype, rt.trust_remote_code, rt.device_map,
                                  rt.max_memory), rt.shard_teacher, procs)


def teacher_for(model, shard: bool, procs) -> ShardedTeacher | WholeTeacher:
    """The teacher as this run holds it: sharded over the launched processes, or whole."""
    if not shard:
        return WholeTeacher(model)
    return ShardedTeacher(model, input_device(model), procs.world)


def is_sharded(model) -> bool:
    return any(isinstance(m, FSDPModule) for m in model.modules())
