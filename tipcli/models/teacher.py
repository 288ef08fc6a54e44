"""The teacher, whatever its home: one interface that score, train and distill see.

A ``Teacher`` is given a batch of the student's sequences and the student's side of them
(its hidden states at the response positions and its LM head) and returns every per-token
signal a score shard stores, with a statement of which are exact and which are estimates
(``statistics``). Three homes implement it, chosen in one place (``make_teacher``):

- ``WholeTeacher``: the model in this process (on one device, or spread by accelerate's
  ``--device-map``); every statistic exact.
- ``ShardedTeacher``: the model sharded over the launched processes with FSDP2 for
  inference (``--shard-teacher``); every statistic exact. Each process holds about 1/N of
  its parameters in the model's dtype; all N compute at once, each on its own data. Loaded
  by name, it is built on the meta device, sharded, and each process reads only its own
  rows of every tensor from the checkpoint's safetensors. Each decoder layer is an FSDP2
  unit gathered for its forward; the input embeddings and an untied LM head are units of
  their own; the rest (the final norm; embeddings and head when tied) is the root unit.
  FSDP2 gathers with collectives, so its forward is a collective step (``collective``):
  every process runs as many batches as the busiest, idle ones on a one-token input
  (``idle``).
- ``ServedTeacher``: the model on its own vLLM server (``--teacher-url``,
  ``tipcli.engines.served``); its sampled-token log-probs and top-k are exact, the
  divergences top-k estimates, its entropy absent.

The in-process teachers (``in_process``) also give what the full-vocabulary losses and the
held-out forward KL need: ``hidden``, ``gathered_head``, ``logits`` and ``model``.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.distributed.fsdp import fully_shard

from tipcli.dist.mesh import decoder_layers, end_group, load_sharded_weights, make_mesh
from tipcli.errors import TipError
from tipcli.models import loading
from tipcli.models.loading import (
    check_model_fits_vocab,
    check_same_vocab,
    context_length,
    empty_model,
    input_device,
    load_tokenizer,
    model_ref,
    real_vocab_size,
)
from tipcli.ops.forward import Batch, body_hidden, head_logits
from tipcli.ops.stats import EXACT_STATISTICS, SERVED_STATISTICS, served_stats, token_stats


@dataclass
class StudentSide:
    """The student's part of a scored batch: hidden states [P, H] at the positions that
    predict each response token, and its LM head (hidden -> logits over V, temperature
    applied)."""

    hidden_PH: torch.Tensor
    logits: Callable[[torch.Tensor], torch.Tensor]


class Teacher(Protocol):
    """What score, train and distill see of a teacher."""

    name: str                      # as given (--teacher)
    statistics: dict[str, str]     # each stored statistic: exact, top-k estimate or absent
    in_process: bool               # its whole distribution is here (the *-full losses)
    collective: bool               # each batch is a collective step of every process

    def ref(self) -> dict[str, Any]:
        """Its provenance in a manifest."""

    def context(self) -> int | None:
        """The longest sequence it can score (None: not known here)."""

    def signals(self, batch: Batch, seqs: list[dict[str, torch.Tensor]], names: list[str],
                student: StudentSide, top_k: int, chunk: int) -> dict[str, torch.Tensor]:
        """Every per-token statistic of a batch (``seqs`` collated into ``batch``;
        ``names`` name the sequences in errors)."""

    def idle(self) -> None:
        """The collective steps of one batch, for a process that has run out of them."""

    def close(self) -> None:
        """Free what it holds (a process group; a server is left serving)."""


# ----------------------------------------------------------------------------- in process


class _Body(torch.nn.Module):
    """The teacher's transformer body as one module, so its forward is the root's."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids_BT, attention_mask_BT):
        return body_hidden(self.model, input_ids_BT, attention_mask_BT)


class _LocalTeacher:
    """What the whole and the sharded teacher share: statistics from both models' logits."""

    statistics = EXACT_STATISTICS
    in_process = True
    model: Any
    device: torch.device
    name: str
    vocab: int
    temperature: float

    def ref(self) -> dict[str, Any]:
        return model_ref(self.name, self.model)

    def context(self) -> int | None:
        return context_length(self.model)

    @contextlib.contextmanager
    def gathered_head(self) -> Iterator[None]:
        yield

    def logits(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Its LM head over the real vocabulary, at the scoring temperature: one function
        for the teacher's life, so a bf16 head is upcast once, not once a batch."""
        if getattr(self, "_logits", None) is None:
            self._logits = head_logits(self.model, self.vocab, self.temperature)
        return self._logits

    def signals(self, batch: Batch, seqs, names, student: StudentSide, top_k: int,
                chunk: int) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            ht = self.hidden(batch.input_ids_BT, batch.attention_mask_BT)
            ht = ht[batch.rows_P.to(ht.device), batch.cols_P.to(ht.device)]
            with self.gathered_head():
                return token_stats(student.hidden_PH, ht, batch.tokens_P, student.logits,
                                   self.logits(), top_k, chunk)

    def hidden(self, input_ids_BT, attention_mask_BT) -> torch.Tensor:
        raise NotImplementedError


class WholeTeacher(_LocalTeacher):
    """The teacher as one process holds it: on one device, or spread by accelerate."""

    collective = False

    def __init__(self, model, name: str, vocab: int, temperature: float = 1.0):
        model.requires_grad_(False)
        self.model, self.name, self.vocab, self.temperature = model, name, vocab, temperature
        self.device = input_device(model)

    def hidden(self, input_ids_BT, attention_mask_BT) -> torch.Tensor:
        """Final hidden states [B, T, H]."""
        with torch.no_grad():
            return body_hidden(self.model, input_ids_BT.to(self.device),
                               attention_mask_BT.to(self.device))

    def idle(self) -> None:
        pass

    def close(self) -> None:
        pass


class ShardedTeacher(_LocalTeacher):
    """``model`` sharded in place over ``world`` processes on ``device`` (its type); a
    model on the meta device is sharded there, for ``load_sharded_weights`` to fill."""

    collective = True

    def __init__(self, model, name: str, vocab: int, device: torch.device, world: int,
                 temperature: float = 1.0):
        model.requires_grad_(False)
        model.eval()
        self.model, self.name, self.vocab, self.temperature = model, name, vocab, temperature
        self.device = device
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
        chunks of logits."""
        if not self.tied:
            self.head.unshard()
        try:
            yield
        finally:
            if self.tied:
                self.body.reshard()
            else:
                self.head.reshard()

    def idle(self) -> None:
        one = torch.ones(1, 1, dtype=torch.long, device=self.device)
        self.hidden(one, one)
        with self.gathered_head():
            pass

    def close(self) -> None:
        end_group(self.own_group)
        self.own_group = False


# ----------------------------------------------------------------------------- served


class ServedTeacher:
    """The teacher on its own vLLM server (``tipcli.engines.served.ServedClient``): it
    answers with the sampled token's log-prob and its top-k; the student's side is computed
    here, the divergences estimated over the top-k and a tail bucket."""

    statistics = SERVED_STATISTICS
    in_process = False
    collective = False

    def __init__(self, client, name: str):
        self.client, self.name = client, name

    @property
    def url(self) -> str:
        return self.client.url

    def ref(self) -> dict[str, Any]:
        key = hashlib.sha256(f"served:{self.url}:{self.client.name}".encode()).hexdigest()
        return {"id": self.name, "url": self.url, "revision": None, "fingerprint": key}

    def context(self) -> int | None:
        return None  # the server refuses what does not fit its context

    def signals(self, batch: Batch, seqs, names, student: StudentSide, top_k: int,
                chunk: int) -> dict[str, torch.Tensor]:
        answers = self.client.score([(s["prompt_ids"].tolist(), s["response_ids"].tolist())
                                     for s in seqs], names)
        asked = {k: torch.cat([a[k] for a in answers]) for k in answers[0]}
        return served_stats(student.hidden_PH, batch.tokens_P, student.logits, asked, chunk)

    def idle(self) -> None:
        pass

    def close(self) -> None:
        self.client.close()


# ----------------------------------------------------------------------------- choosing


def make_teacher(name: str, tok, runtime, procs, device, dtype, scoring=None,
                 temperature: float = 1.0, model=None, student: str = "student") -> Teacher:
    """The teacher ``name`` as the settings ask, the one place its home is chosen: served
    at ``scoring.teacher_url``; else ``model`` if given (already loaded), or loaded; sharded
    over the launched processes with ``runtime.shard_teacher`` (by name: from the meta
    device, each process reading only its own rows), else whole (on ``device``, or spread
    with ``--device-map``). Checked against the student's tokenizer ``tok``; its logits at
    ``scoring.score_temperature`` (or ``temperature``). A teacher already made is returned
    as it is."""
    if model is not None and not isinstance(model, torch.nn.Module):
        return model  # a Teacher already (the loop's)
    vocab = real_vocab_size(tok)
    if scoring is not None:
        temperature = scoring.score_temperature
    if scoring is not None and scoring.teacher_url:
        from tipcli.engines.served import ServedClient

        return ServedTeacher(ServedClient(scoring.teacher_url, name, tok, scoring.teacher_top_k,
                                          scoring.teacher_concurrency, scoring.teacher_timeout),
                             name)
    if model is None:
        check_same_vocab(tok, load_tokenizer(name, runtime.trust_remote_code), student, name)
        teacher = _load(name, vocab, temperature, device, dtype, runtime, procs)
    else:
        teacher = _wrap(model, name, vocab, temperature, runtime.shard_teacher, procs)
    check_model_fits_vocab(teacher.model, tok, name)
    return teacher


def _load(name: str, vocab: int, temperature: float, device, dtype, rt, procs
          ) -> WholeTeacher | ShardedTeacher:
    if rt.shard_teacher:
        model, files = empty_model(name, rt.trust_remote_code)
        if files is not None:
            model.to(dtype)  # on the meta device: no memory
            teacher = ShardedTeacher(model, name, vocab, torch.device(device), procs.world,
                                     temperature)
            load_sharded_weights(model, files, device)
            return teacher
    return _wrap(loading.load_model(name, device, dtype, rt.trust_remote_code, rt.device_map,
                            rt.max_memory), name, vocab, temperature, rt.shard_teacher, procs)


def _wrap(model, name: str, vocab: int, temperature: float, shard: bool, procs
          ) -> WholeTeacher | ShardedTeacher:
    if not shard:
        return WholeTeacher(model, name, vocab, temperature)
    return ShardedTeacher(model, name, vocab, input_device(model), procs.world, temperature)


def require_in_process(teacher: Teacher, why: str) -> Teacher:
    """``teacher``, refused in one line where ``why`` needs its whole distribution here."""
    if not teacher.in_process:
        raise TipError(f"{why} needs the teacher's whole distribution in this process, but "
                       f"{teacher.name} is served (--teacher-url): use a *-topk loss or "
                       "rkl-sampled")
    return teacher
