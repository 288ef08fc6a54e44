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
import dataclasses
import gc
import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.distributed.fsdp import fully_shard

from tipcli.dist.mesh import decoder_layers, end_group, load_sharded_weights, make_mesh
from tipcli.configs import named_teachers, teacher_urls
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
from tipcli.ops.forward import Batch, body_hidden, collate, head_logits
from tipcli.ops.stats import (
    EXACT_STATISTICS,
    SERVED_STATISTICS,
    _log_softmax_,
    served_stats,
    token_stats,
)


def tokenizers_differ(student_tok, teacher_tok) -> bool:
    """Whether two tokenizers map any id to another token."""
    return student_tok.get_vocab() != teacher_tok.get_vocab()


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

    def own_logprobs(self, seqs: list[dict[str, torch.Tensor]], pad_id: int, top_k: int,
                     chunk: int, names: list[str] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Over its own vocabulary (a teacher with another tokenizer, ``tipcli.models.cross``):
        its log-prob of each response token of ``seqs`` (its own ids), flat [T], and its
        top-k log-probs and ids there [T, k] (-inf and 0 past its vocabulary)."""
        tb = collate(seqs, pad_id)
        logits = self.logits()
        k = min(top_k, self.vocab)
        lps, vals, ids = [], [], []
        with torch.no_grad():
            ht = self.hidden(tb.input_ids_BT, tb.attention_mask_BT)
            ht = ht[tb.rows_P.to(ht.device), tb.cols_P.to(ht.device)]
            tokens = tb.tokens_P.to(ht.device)
            with self.gathered_head():
                for a in range(0, tokens.shape[0], chunk):
                    lt = _log_softmax_(logits(ht[a:a + chunk]), inplace=True)
                    lps.append(lt.gather(-1, tokens[a:a + chunk, None]).squeeze(-1).cpu())
                    v, i = lt.topk(k, dim=-1)
                    vals.append(v.cpu())
                    ids.append(i.cpu())
        if not lps:
            return (torch.zeros(0), torch.zeros(0, top_k),
                    torch.zeros(0, top_k, dtype=torch.long))
        return _padded(torch.cat(lps), torch.cat(vals), torch.cat(ids), top_k)

    def hidden(self, input_ids_BT, attention_mask_BT) -> torch.Tensor:
        raise NotImplementedError


def _padded(lp_T: torch.Tensor, top_lp_Tk: torch.Tensor, top_ids_Tk: torch.Tensor, top_k: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k padded to ``top_k`` columns (-inf log-probs, id 0) where fewer came."""
    short = top_k - top_lp_Tk.shape[-1]
    return (lp_T, torch.nn.functional.pad(top_lp_Tk, (0, short), value=-math.inf),
            torch.nn.functional.pad(top_ids_Tk.long(), (0, short), value=0))


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

    def own_logprobs(self, seqs: list[dict[str, torch.Tensor]], pad_id: int, top_k: int,
                     chunk: int, names: list[str] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As ``_LocalTeacher.own_logprobs``, from the server: its log-prob of each of its
        own response tokens and its top-k there (the server's ``--teacher-top-k``)."""
        answers = self.client.score([(s["prompt_ids"].tolist(), s["response_ids"].tolist())
                                     for s in seqs], names)
        k = self.client.top_k
        if not answers:
            return torch.zeros(0), torch.zeros(0, top_k), torch.zeros(0, top_k, dtype=torch.long)
        lp = torch.cat([a["teacher_logprob"] for a in answers])
        top_lp = torch.cat([a["teacher_topk_logprobs"] for a in answers])[:, :min(k, top_k)]
        top_ids = torch.cat([a["teacher_topk_ids"] for a in answers])[:, :min(k, top_k)]
        return _padded(lp, top_lp, top_ids, top_k)

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
    several = named_teachers(name)
    if several is not None:  # each made as it would be alone
        from tipcli.models.several import SeveralTeachers

        urls = teacher_urls(scoring.teacher_url) if scoring is not None else {}

        def loader(n: str, m: str) -> Callable[[], Teacher]:
            url = m if m.startswith(("http://", "https://")) else urls.get(n, "")
            own = dataclasses.replace(scoring, teacher_url=url) if scoring is not None else None
            if url and url == m:  # NAME=URL: the model the server serves
                from tipcli.engines.served import ServedClient

                m = ServedClient.served_model(url, scoring.teacher_timeout)
            return lambda: make_teacher(m, tok, runtime, procs, device, dtype, own,
                                        temperature, student=student)

        loaders = {n: loader(n, m) for n, m in several.items()}
        at_a_time = scoring is not None and scoring.teacher_at_a_time
        made: dict[str, Teacher] = {}
        try:
            for n, load in loaders.items():
                made[n] = load()
                if at_a_time:  # what it is, for the manifest; loaded again to score
                    known = _Known(made[n])
                    made[n].close()
                    made[n] = known
                    gc.collect()
        except BaseException:
            for t in made.values():
                t.close()
            raise
        return SeveralTeachers(made, scoring.teacher_field if scoring is not None else
                               "teacher", tok.pad_token_id, loaders if at_a_time else None)
    vocab = real_vocab_size(tok)
    if scoring is not None:
        temperature = scoring.score_temperature
    mode = scoring.cross_tokenizer if scoring is not None else "off"
    if scoring is not None and scoring.teacher_url:
        return _served(name, tok, scoring, runtime, mode)
    if model is None:
        t_tok = load_tokenizer(name, runtime.trust_remote_code)
        if mode == "force" or (mode == "auto" and tokenizers_differ(tok, t_tok)):
            from tipcli.models.cross import CrossTeacher

            inner = _load(name, real_vocab_size(t_tok), temperature, device, dtype, runtime,
                          procs)
            check_model_fits_vocab(inner.model, t_tok, name)
            return CrossTeacher(inner, t_tok, tok)
        check_same_vocab(tok, t_tok, student, name)
        teacher = _load(name, vocab, temperature, device, dtype, runtime, procs)
    else:
        teacher = _wrap(model, name, vocab, temperature, runtime.shard_teacher, procs)
    check_model_fits_vocab(teacher.model, tok, name)
    return teacher


def _served(name: str, tok, scoring, runtime, mode: str) -> Teacher:
    """The teacher on its server; with another tokenizer than the student's (its own read
    here from ``--teacher``, a path or hub id, which vLLM serves under that name), read as
    text (``tipcli.models.cross``)."""
    from tipcli.engines.served import ServedClient

    t_tok = None
    if mode != "off":
        try:
            t_tok = load_tokenizer(name, runtime.trust_remote_code)
        except TipError as exc:
            if Path(name).exists():  # a model here whose tokenizer does not load
                raise
            if mode == "force":
                raise TipError(f"--cross-tokenizer force with --teacher-url reads the teacher's "
                               f"tokenizer here, but --teacher {name} has none to load "
                               f"({exc}): pass the served model's path or hub id as --teacher "
                               "(vLLM serves it under that name)") from None
    cross = t_tok is not None and (mode == "force" or tokenizers_differ(tok, t_tok))
    client = ServedClient(scoring.teacher_url, name, t_tok if cross else tok,
                          scoring.teacher_top_k, scoring.teacher_concurrency,
                          scoring.teacher_timeout, own=cross)
    served = ServedTeacher(client, name)
    if not cross:
        return served
    from tipcli.models.cross import CrossTeacher

    return CrossTeacher(served, t_tok, tok)


class _Known:
    """What a teacher that was loaded and freed is (one teacher at a time): its name,
    statistics, provenance and context, to state in the manifest."""

    def __init__(self, teacher: Teacher):
        self.name, self.statistics = teacher.name, teacher.statistics
        self.in_process, self.collective = teacher.in_process, teacher.collective
        self._ref, self._context = teacher.ref(), teacher.context()

    def ref(self) -> dict[str, Any]:
        return self._ref

    def context(self) -> int | None:
        return self._context

    def idle(self) -> None:
        pass

    def close(self) -> None:
        pass


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


def require_in_process(teacher: Teacher, why: str,
                       fix: str = "use a *-topk loss or rkl-sampled") -> Teacher:
    """``teacher``, refused in one line where ``why`` needs its whole distribution here."""
    if not teacher.in_process:
        where = getattr(teacher, "why_not_whole", "") or "is served (--teacher-url)"
        raise TipError(f"{why} needs the teacher's whole distribution over the student's "
                       f"vocabulary in this process, but {teacher.name} {where}: {fix}")
    return teacher
