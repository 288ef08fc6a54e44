"""A teacher with another tokenizer: it reads the student's responses as text.

``CrossTeacher`` wraps a teacher (whole, sharded or served: each gives ``own_logprobs``
over its own vocabulary) whose tokenizer is not the student's (``--cross-tokenizer``). For
each sequence the teacher reads the prompt rendered with its own chat template (from the
prompt record the rollout sampled from) and the response's text tokenized its own way; the
two tokenizations are aligned into spans by character offsets (``tipcli.ops.align``). Per
student token:

- ``student_logprob`` and ``student_entropy``: exact (the student's own distribution);
- ``teacher_logprob``: the token's student log-prob plus its share of the span's
  ``log r`` (the span's teacher log-prob, exact, minus its student log-prob; shared evenly
  by the span's student tokens, ``tipcli.ops.align.spread``), so a response's add up to the
  teacher's log-prob of its text; on a span of one token on each side, the teacher's
  log-prob of that token, exact;
- ``rkl``, ``fkl``, ``jsd`` ("aligned estimates"): on a span of one token on each side,
  over the teacher's top-k candidates whose strings are single student tokens
  (``vocabulary_map``) plus one tail bucket on each side (``mapped_divergences``, the
  ``*-topk`` coarsening); elsewhere sampled estimates over the span, from the ratio
  ``r = p_t(span) / p_s(span)`` of the span's probabilities (the student sampled it):
  ``-log r`` (the span's student log-prob minus the teacher's, unbiased), ``(log r)^2 / 2``
  (second order, low variance) and the unbiased JSD estimate clipped to [0, ln 2]
  (``span_divergences``), spread evenly over the span's student tokens;
- no teacher entropy (the teacher's distribution is over its own vocabulary); the stored
  top-k is the teacher's candidates on one-to-one spans as student ids (-1, log-prob 0,
  where a candidate has no single student token and on longer spans), for the ``*-topk``
  losses.

The manifest says so (``CROSS_STATISTICS``). A student response that ends with the
student's EOS is read by the teacher ending with its own EOS, a one-to-one span. The
last tokens of a response cut inside a character (at ``--max-new-tokens``) have no text
for the teacher to read: they form a span given the student's own log-prob (no signal).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tipcli.errors import TipError
from tipcli.models.loading import real_vocab_size
from tipcli.ops.align import Spans, align, span_log_ratio, spread, student_ends, teacher_tokens
from tipcli.ops.forward import Batch
from tipcli.ops.stats import student_side

CROSS_STATISTICS = {"student_logprob": "exact", "teacher_logprob": "span estimate",
                    "student_entropy": "exact", "teacher_entropy": "absent",
                    "rkl": "aligned estimate", "fkl": "aligned estimate",
                    "jsd": "aligned estimate",
                    "teacher_topk": "aligned estimate"}
MAX_SPAN = 32  # tokens on either side of a span: past this the two tokenizers disagree badly


def span_divergences(log_r_N: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sampled estimates over spans from ``log r`` (the span's teacher log-prob minus the
    student's, which sampled it), float64: rKL ``-log r``, unbiased; fKL ``(log r)^2 / 2``
    (the second-order estimate, which holds for either direction; the unbiased
    ``r log r - (r - 1)`` has a tail as heavy as ``r``, which a span the teacher finds far
    likelier makes thousands of nats); JSD ``(r log r - (1 + r) log((1 + r) / 2)) / 2``,
    unbiased, clipped to JSD's range [0, ln 2]."""
    r = log_r_N.exp()
    r_log_r = torch.where(r > 0, r * log_r_N, torch.zeros_like(r))
    half = torch.log1p(r) - math.log(2.0)  # log((1 + r) / 2)
    return {"rkl": -log_r_N, "fkl": 0.5 * log_r_N.square(),
            "jsd": (0.5 * (r_log_r - (1 + r) * half)).clamp(0, math.log(2.0))}


def vocabulary_map(t_tok, s_tok) -> torch.Tensor:
    """Each teacher id [V_t] as the student id that is the same string alone (-1: none):
    the teacher's token decodes to a string the student's tokenizer encodes as one token
    that decodes back to it. The EOS tokens map to each other."""
    n = real_vocab_size(t_tok)
    strings = [t_tok.decode([i], clean_up_tokenization_spaces=False) for i in range(n)]
    out = torch.full((n,), -1, dtype=torch.long)
    encoded = s_tok(strings, add_special_tokens=False)["input_ids"]
    for i, (text, ids) in enumerate(zip(strings, encoded)):
        if (len(ids) == 1 and "\ufffd" not in text
                and s_tok.decode(ids, clean_up_tokenization_spaces=False) == text):
            out[i] = ids[0]
    if t_tok.eos_token_id is not None and s_tok.eos_token_id is not None:
        out[t_tok.eos_token_id] = s_tok.eos_token_id
    return out


def mapped_divergences(s_lp_Ck: torch.Tensor, t_lp_Ck: torch.Tensor, valid_Ck: torch.Tensor
                       ) -> dict[str, torch.Tensor]:
    """rKL, fKL and JSD over the teacher's top-k candidates that are student tokens
    (``valid``; the student's and the teacher's log-probs of each) and one tail bucket on
    each side holding the rest of its mass (floored), float64: the ``*-topk`` coarsening,
    a lower bound of the exact divergences when every candidate maps."""
    from tipcli.ops.losses import TAIL_FLOOR, divergence

    def buckets(lp: torch.Tensor) -> torch.Tensor:
        lp = torch.where(valid_Ck, lp.double(), torch.full_like(lp, -math.inf, dtype=torch.float64))
        tail = (-torch.expm1(lp.logsumexp(-1, keepdim=True))).clamp_min(TAIL_FLOOR).log()
        return torch.cat([lp, tail], dim=-1)

    log_q, log_r = buckets(s_lp_Ck), buckets(t_lp_Ck)
    return {k: divergence(k, log_q, log_r).clamp_min(0) for k in ("rkl", "fkl", "jsd")}


def align_response(s_tok, t_tok, ids: list[int], what: str, max_span: int = MAX_SPAN
                   ) -> tuple[list[int], Spans]:
    """A student response ``ids`` as the teacher reads it (its own tokens of the text, its
    EOS for the student's) and the spans of the two: the tokens after the last whole
    character (a response cut inside one) are a span with no teacher tokens."""
    eos = bool(ids) and ids[-1] == s_tok.eos_token_id
    body = ids[:-1] if eos else ids
    text = s_tok.decode(body, clean_up_tokenization_spaces=False)
    ends = student_ends(s_tok, body, text)
    whole = next((i + 1 for i in range(len(ends) - 1, -1, -1) if ends[i] >= 0), 0)
    text = text[:ends[whole - 1]] if whole else ""
    t_ids, t_ends = teacher_tokens(t_tok, text, what)
    spans = align(ends[:whole], t_ends, max_span)
    s_starts, t_starts = [spans.student_starts], [spans.teacher_starts]
    if whole < len(body):  # one span the teacher reads nothing of
        s_starts.append(torch.tensor([len(body)]))
        t_starts.append(spans.teacher_starts[-1:])
    if eos:
        if t_tok.eos_token_id is None:
            raise TipError(f"the teacher's tokenizer has no EOS token to read the end of {what} "
                           "with: set eos_token in its tokenizer_config.json")
        t_ids.append(t_tok.eos_token_id)
        s_starts.append(torch.tensor([len(body) + 1]))
        t_starts.append(spans.teacher_starts[-1:] + 1)
    return t_ids, Spans(torch.cat(s_starts), torch.cat(t_starts))


class CrossTeacher:
    """``inner`` (a ``WholeTeacher``, ``ShardedTeacher`` or ``ServedTeacher`` over its own
    vocabulary) as the teacher of a student with tokenizer ``s_tok``; ``prompts`` the
    records the rollout sampled from (``use_prompts``), rendered with ``t_tok``'s chat
    template."""

    statistics = CROSS_STATISTICS
    in_process = False  # its distribution is not over the student's vocabulary
    why_not_whole = "has another tokenizer (--cross-tokenizer)"

    def __init__(self, inner, t_tok, s_tok, max_span: int = MAX_SPAN):
        self.inner, self.t_tok, self.s_tok, self.max_span = inner, t_tok, s_tok, max_span
        self.name, self.collective = inner.name, inner.collective
        self.t_vocab = real_vocab_size(t_tok)
        self.prompts: list[dict] | None = None
        self._map: torch.Tensor | None = None
        self.source = None
        if bool(getattr(s_tok, "chat_template", None)) != bool(getattr(t_tok, "chat_template",
                                                                       None)):
            side = "the teacher" if getattr(s_tok, "chat_template", None) else "the student"
            raise TipError(f"{side}'s tokenizer has no chat template but the other's has: the "
                           "teacher would read the prompt in another form than the student "
                           "saw it; give both a chat template (tokenizer_config.json) or neither")

    def ref(self) -> dict[str, Any]:
        return {**self.inner.ref(), "cross_tokenizer": True}

    def context(self) -> int | None:
        return self.inner.context()

    def use_prompts(self, records: list[dict], source) -> None:
        """The prompt records the rollout sampled from (by ``prompt_index``)."""
        self.prompts, self.source = records, source

    def teacher_prompt(self, seq: dict[str, torch.Tensor], name: str) -> list[int]:
        from tipcli.models.prompts import encode_prompt

        if self.prompts is None or "prompt_index" not in seq:
            raise TipError(f"{name} names no prompt record, which a teacher with another "
                           "tokenizer renders with its own chat template: score a rollout "
                           "that tip rollout wrote")
        return encode_prompt(self.t_tok, self.prompts[int(seq["prompt_index"])], self.source)

    def aligned(self, seq: dict[str, torch.Tensor], name: str) -> tuple[list[int], Spans]:
        """The teacher's response tokens of ``seq`` and their spans with the student's."""
        return align_response(self.s_tok, self.t_tok, seq["response_ids"].tolist(),
                              f"the response of {name}", self.max_span)

    def signals(self, batch: Batch, seqs, names, student, top_k: int,
                chunk: int) -> dict[str, torch.Tensor]:
        t_seqs, spans = [], []
        for seq, name in zip(seqs, names):
            t_ids, sp = self.aligned(seq, name)
            t_seqs.append({"prompt_ids": torch.tensor(self.teacher_prompt(seq, name)),
                           "response_ids": torch.tensor(t_ids, dtype=torch.long)})
            spans.append(sp)
        t_lp, t_top_lp, t_top_ids = self.teacher_logprobs(t_seqs, top_k, chunk, names)
        lengths = [int(s["response_ids"].numel()) for s in t_seqs]
        t_parts = t_lp.split(lengths)
        # the teacher's top-k on one-to-one spans, as student ids (-1: no single student token)
        ids_Pk = torch.full((batch.tokens_P.numel(), top_k), -1, dtype=torch.long)
        t_top_Pk = torch.full((batch.tokens_P.numel(), top_k), -math.inf)
        one_P = torch.zeros(batch.tokens_P.numel(), dtype=torch.bool)
        if top_k:
            s_at, t_at = 0, 0
            for sp, s_len, t_len in zip(spans, batch.lengths, lengths):
                one = sp.one_to_one_N()
                si, ti = sp.student_starts[:-1][one] + s_at, sp.teacher_starts[:-1][one] + t_at
                one_P[si] = True
                ids_Pk[si] = self.to_student(t_top_ids[ti])
                t_top_Pk[si] = t_top_lp[ti]
                s_at, t_at = s_at + s_len, t_at + t_len
        out = student_side(student.hidden_PH, batch.tokens_P, student.logits, chunk,
                           ids_Pk if top_k else None)
        s_parts = out["student_logprob"].split(batch.lengths)
        cols: dict[str, list[torch.Tensor]] = {k: [] for k in ("teacher_logprob", "rkl", "fkl",
                                                                "jsd")}
        for s_lp, tl, sp in zip(s_parts, t_parts, spans):
            log_r_N = span_log_ratio(s_lp, tl, sp)
            log_r_N[sp.teacher_starts.diff() == 0] = 0  # no text: no signal
            cols["teacher_logprob"].append((s_lp.double() + spread(log_r_N, sp)).float())
            for k, v in span_divergences(log_r_N).items():
                cols[k].append(spread(v, sp).float())
        stats = {k: torch.cat(v) if v else torch.zeros(0) for k, v in cols.items()}
        if top_k and bool(one_P.any()):
            mapped = mapped_divergences(out["gathered"][one_P], t_top_Pk[one_P],
                                        (ids_Pk[one_P] >= 0) & t_top_Pk[one_P].isfinite())
            for k, v in mapped.items():
                stats[k][one_P] = v.float()
        out.pop("gathered", None)
        if top_k:  # the mapped candidates, for the *-topk losses: -1 (and 0) where none
            valid_Pk = (ids_Pk >= 0) & t_top_Pk.isfinite()
            stats["teacher_topk_ids"] = ids_Pk.masked_fill(~valid_Pk, -1).to(torch.int32)
            stats["teacher_topk_logprobs"] = t_top_Pk.masked_fill(~valid_Pk, 0.0).float()
        return {**out, **stats}

    def to_student(self, t_ids: torch.Tensor) -> torch.Tensor:
        """Teacher ids as the student's ids of the same string (-1: none), each student id
        once a row (a repeat is -1: its mass goes to the tail)."""
        if self._map is None:
            self._map = vocabulary_map(self.t_tok, self.s_tok)
        ids = self._map[t_ids.long()]
        k = ids.shape[-1]
        earlier = (ids[..., :, None] == ids[..., None, :]) & torch.ones(k, k, dtype=torch.bool
                                                                        ).tril(-1)
        return ids.masked_fill(earlier.any(-1) & (ids >= 0), -1)

    def teacher_logprobs(self, t_seqs: list[dict[str, torch.Tensor]], top_k: int, chunk: int,
                         names: list[str] | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The teacher's log-prob of each of its own response tokens, flat [T], and its
        top-k log-probs and ids there [T, k] (over its own vocabulary; -inf past it)."""
        pad = self.t_tok.pad_token_id if self.t_tok.pad_token_id is not None else 0
        return self.inner.own_logprobs(t_seqs, pad, top_k, chunk, names)

    @property
    def url(self) -> str | None:
        return getattr(self.inner, "url", None)

    def idle(self) -> None:
        self.inner.idle()

    def close(self) -> None:
        self.inner.close()
