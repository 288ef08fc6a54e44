"""Several teachers: each prompt scored by its own (``--teacher NAME=MODEL`` repeated).

    tip score runs/rollout --teacher math=M1 --teacher code=M2 -o runs/score

Each prompt record names its teacher in a field (``--teacher-field``, default ``teacher``);
the rollout keeps every field of the records it sampled and each response's
``prompt_index``, so the score reads the route from the rollout itself. A batch is cut
into one sub-batch per teacher, each scored by that teacher alone (``Teacher.signals`` on
its sequences and the student's hidden states at their positions), and the pieces put
back in order: every statistic of a response is its teacher's, as if that teacher alone
had scored it. Each teacher keeps its own home and exactness (a teacher of another
tokenizer is aligned, ``tipcli.models.cross``); the shard stores ``teacher_route`` [T],
each token's teacher as its index in the manifest's ``models.teacher.teachers``, so that
selection never mixes teachers in a normalisation group. The manifest's
``summary.statistics`` is each statistic's exactness where all teachers agree ("mixed"
where they do not; each teacher's own in ``summary.teachers``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
from collections.abc import Callable, Iterator
from typing import Any

import torch

from tipcli.errors import TipError
from tipcli.ops.forward import Batch, collate

MIXED = "mixed estimate"


def routes(records: list[dict], field: str, names: list[str], where: str) -> list[int]:
    """Each record's teacher as an index into ``names``; one line for a record that names
    none or an unknown one."""
    out = []
    for i, r in enumerate(records):
        name = r.get(field) if isinstance(r, dict) else None
        if name is None:
            raise TipError(f"prompt {i} of {where} names no teacher in its '{field}' field, but "
                           f"several are given ({', '.join(names)}): add the field to every "
                           "prompt (or name another with --teacher-field)")
        if name not in names:
            raise TipError(f"prompt {i} of {where} names teacher '{name}' in its '{field}' "
                           f"field, which is none of --teacher {', '.join(names)}")
        out.append(names.index(name))
    return out


class SeveralTeachers:
    """``teachers`` ({name: Teacher}), each sequence routed by its prompt record's
    ``field``; ``pad_id`` pads their sub-batches (the student's, as one teacher's are)."""

    in_process = False
    why_not_whole = "is several teachers (--teacher NAME=MODEL)"

    def __init__(self, teachers: dict[str, Any], field: str, pad_id: int,
                 make: dict[str, Callable[[], Any]] | None = None):
        self.teachers, self.field, self.pad_id = teachers, field, pad_id
        self.names = list(teachers)
        self.name = " ".join(f"{n}={t.name}" for n, t in teachers.items())
        self.route_of: list[int] | None = None
        self.records: tuple | None = None
        # one at a time (``make``: each teacher's loader): ``teachers`` hold what each was
        # when first loaded, for the manifest; ``holding`` loads one for a shard's batches
        self.make, self.held = make, None
        # sharded teachers (--shard-teacher): each batch is a collective step of each
        self.collective = any(t.collective for t in teachers.values())

    @property
    def one_at_a_time(self) -> bool:
        return self.make is not None

    @contextlib.contextmanager
    def holding(self, index: int) -> Iterator[None]:
        """Teacher ``index`` loaded while the block runs (one at a time), then freed."""
        name = self.names[index]
        teacher = self.make[name]()
        if self.records is not None and hasattr(teacher, "use_prompts"):
            teacher.use_prompts(*self.records)
        self.held = (index, teacher)
        try:
            yield
        finally:
            self.held = None
            teacher.close()
            del teacher
            gc.collect()

    @property
    def statistics(self) -> dict[str, str]:
        each = [t.statistics for t in self.teachers.values()]
        out = {}
        for k in each[0]:
            kinds = {s.get(k, "absent") for s in each}
            out[k] = kinds.pop() if len(kinds) == 1 else "absent" if "absent" in kinds else MIXED
        return out

    def ref(self) -> dict[str, Any]:
        return {"teachers": {n: t.ref() for n, t in self.teachers.items()},
                "field": self.field}

    def context(self) -> int | None:
        known = [c for c in (t.context() for t in self.teachers.values()) if c is not None]
        return min(known) if known else None

    def use_prompts(self, records: list[dict], source, where: str = "the prompts") -> None:
        """The records the rollout sampled from: their routes, and the records themselves
        for a teacher with another tokenizer."""
        self.route_of = routes(records, self.field, self.names, where)
        self.records = (records, source)
        for t in self.teachers.values():
            if hasattr(t, "use_prompts"):
                t.use_prompts(records, source)

    def route(self, seq: dict[str, torch.Tensor], name: str) -> int:
        if self.route_of is None or "prompt_index" not in seq:
            raise TipError(f"{name} names no prompt record, which routes it to its teacher: "
                           "score a rollout that tip rollout wrote")
        return self.route_of[int(seq["prompt_index"])]

    def signals(self, batch: Batch, seqs, names, student, top_k: int,
                chunk: int) -> dict[str, torch.Tensor]:
        route_N = [self.route(s, n) for s, n in zip(seqs, names)]
        if self.make is not None:  # one at a time: the held teacher's sequences only
            if self.held is None or set(route_N) != {self.held[0]}:
                raise RuntimeError("one teacher at a time: score a batch of the held "
                                   "teacher's sequences")
            teachers = {self.held[0]: self.held[1]}
        else:
            teachers = dict(enumerate(self.teachers.values()))
        starts = [0]
        for n in batch.lengths:
            starts.append(starts[-1] + n)
        out: dict[str, torch.Tensor] = {}
        for ti, teacher in teachers.items():
            mine = [i for i, r in enumerate(route_N) if r == ti]
            if not mine:
                if teacher.collective:  # the other processes may score with it now
                    teacher.idle()
                continue
            pos = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in mine])
            sub = [seqs[i] for i in mine]
            part = teacher.signals(collate(sub, self.pad_id), sub, [names[i] for i in mine],
                                   dataclasses.replace(student, hidden_PH=student.hidden_PH[
                                       pos.to(student.hidden_PH.device)]),
                                   top_k, chunk)
            for k, v in part.items():
                if k not in out:
                    out[k] = torch.zeros((starts[-1], *v.shape[1:]), dtype=v.dtype)
                out[k][pos] = v.to(out[k].device)
        # a statistic one teacher cannot give is stored for none
        absent = {k for t in self.teachers.values() for k, v in t.statistics.items()
                  if v == "absent"}
        kept = {k: v for k, v in out.items()
                if k not in absent and not (k.startswith("teacher_topk") and
                                            "teacher_topk" in absent)}
        routes_T = torch.repeat_interleave(torch.tensor(route_N, dtype=torch.int16),
                                           torch.tensor(batch.lengths))
        return {**kept, "teacher_route": routes_T}

    def tokens(self, rollout) -> dict[str, int]:
        """Response tokens per teacher over the whole ``rollout`` directory."""
        counts = dict.fromkeys(self.names, 0)
        for i in range(len(rollout.shards)):
            shard = rollout.load_shard(i)
            lengths = shard["response_offsets"].diff().tolist()
            for p, n in zip(shard["prompt_index"].tolist(), lengths):
                counts[self.names[self.route_of[p]]] += int(n)
        return counts

    def summary(self, rollout) -> dict[str, Any]:
        counts = self.tokens(rollout)
        return {n: {"tokens": counts[n], "statistics": t.statistics}
                for n, t in self.teachers.items()}

    def idle(self) -> None:
        for t in self.teachers.values():
            t.idle()

    def close(self) -> None:
        if self.make is None:
            for t in self.teachers.values():
                t.close()
