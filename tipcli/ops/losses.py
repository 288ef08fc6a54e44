"""Distillation losses per kept token, and the chunked LM head that only pays for kept tokens.

    tip train runs/score --loss rkl-topk --strategy soft-or --keep 0.5 -o runs/train

Every loss returns one value per kept position (``loss_K``); the trainer sums them and
divides by the global number of kept tokens. Distributions are over the real
vocabulary only (logit columns beyond it are dropped by the head function).

- ``*-topk``: the teacher's stored top-k ids plus one tail bucket on each side. Student
  buckets: ``log p_s(id_j)`` and ``log(1 - sum_j p_s(id_j))``; teacher buckets: the stored
  log-probs and ``log(1 - sum_j exp(stored_j))``. Both tails are floored at ``TAIL_FLOOR``
  so that a teacher whose stored top-k rounds to all of its mass gives a finite loss.
- ``rkl-sampled``: ``-w * A`` with the detached advantage ``A = -(log p_s(y) - log p_t(y))``
  and ``w = exp(log p_s(y) - rollout_logprob)`` (the gradient flows through ``w``), so the
  gradient is ``E_y~rollout[w (log p_s - log p_t) grad log p_s]``, the reverse-KL policy
  gradient, and the value is the sampled estimate of the reverse KL.
- ``*-full``: exact divergences from both models' full logits.

``chunked_token_loss`` applies the head and the loss ``chunk_size`` positions at a time,
each chunk under ``torch.utils.checkpoint`` so its logits are rebuilt in backward: peak
memory grows with ``chunk_size x V``, never with ``K x V``.

Shape letters: K kept positions, C positions in a chunk, H hidden, V vocabulary, k top-k.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tipcli.catalog import LOSSES
from tipcli.ops.forward import wide

LN2 = math.log(2.0)
TAIL_FLOOR = 1e-12
LOG_TAIL_FLOOR = math.log(TAIL_FLOOR)


def _plogq(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum p (log_p - log_q) over the last dim, 0 where p is 0."""
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def divergence(kind: str, log_q: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
    """``kind`` in rkl, fkl, jsd between student ``q`` and teacher ``r`` (log-probs, last dim)."""
    q, r = log_q.exp(), log_r.exp()
    if kind == "rkl":
        return _plogq(q, log_q, log_r)
    if kind == "fkl":
        return _plogq(r, log_r, log_q)
    log_m = torch.logaddexp(log_q, log_r) - LN2
    return 0.5 * _plogq(q, log_q, log_m) + 0.5 * _plogq(r, log_r, log_m)


class _BucketLogProbs(torch.autograd.Function):
    """x [C, V], ids [C, k] -> [x_id - lse(x), log(sum of e^x off the ids) - lse(x)].

    An id of -1 is no candidate (a teacher with another tokenizer, whose candidate has no
    student token): its bucket is -inf (probability 0) and its mass stays in the tail; the
    other ids of a row are distinct. Backward, with p = softmax(x), G the sum of all output
    grads, g_t the tail's grad (0 where the tail is floored) and p_rest the mass off the
    ids: grad_v = p_v (g_t / p_rest - G) off the ids and g_j - p_v G on id j, computed in
    place in the saved exp buffer (so one graph cannot run backward twice)."""

    @staticmethod
    def forward(ctx, x_CV, ids_Ck):
        valid_Ck = ids_Ck >= 0
        at_Ck = ids_Ck.clamp_min(0)
        m_C1 = x_CV.max(-1, keepdim=True).values
        e_CV = (x_CV - m_C1).exp_()
        s_C1 = e_CV.sum(-1, keepdim=True)
        e_Ck = e_CV.gather(-1, at_Ck).masked_fill_(~valid_Ck, 0.0)
        # zero the candidates' entries; a product, so a -1 (read at 0) leaves entry 0 as it is
        e_CV.scatter_reduce_(-1, at_Ck, (~valid_Ck).to(e_CV.dtype), reduce="prod")
        rest_C1 = e_CV.sum(-1, keepdim=True)
        log_tail = rest_C1.log() - s_C1.log()
        floored = log_tail < LOG_TAIL_FLOOR
        lse_C1 = m_C1 + s_C1.log()
        ids_out = (x_CV.gather(-1, at_Ck) - lse_C1).masked_fill_(~valid_Ck, -math.inf)
        out = torch.cat([ids_out, log_tail.clamp_min(LOG_TAIL_FLOOR)], -1)
        ctx.save_for_backward(e_CV, e_Ck, s_C1, rest_C1, at_Ck, valid_Ck, floored)
        ctx.used = False
        return out

    @staticmethod
    def backward(ctx, g_Ck1):
        if ctx.used:
            raise RuntimeError("student_buckets: backward ran twice over one graph")
        ctx.used = True
        e_CV, e_Ck, s_C1, rest_C1, at_Ck, valid_Ck, floored = ctx.saved_tensors
        g_t = g_Ck1[:, -1:].masked_fill(floored, 0.0)
        g_Ck = g_Ck1[:, :-1].masked_fill(~valid_Ck, 0.0)  # a -inf bucket's grad may be NaN
        total = g_Ck.sum(-1, keepdim=True) + g_t
        grad_CV = e_CV.mul_(g_t / rest_C1.clamp_min(torch.finfo(e_CV.dtype).tiny)
                            - total / s_C1)
        # the candidates' entries are 0 here (zeroed in forward): adding sets them
        grad_CV.scatter_add_(-1, at_Ck, (g_Ck - e_Ck / s_C1 * total).masked_fill_(~valid_Ck,
                                                                                   0.0))
        return grad_CV, None


def student_buckets(s_logits_CV: torch.Tensor, ids_Ck: torch.Tensor) -> torch.Tensor:
    """Student log-probs [C, k+1] on the k ids (-inf at an id of -1) and the tail (all other
    tokens), floored.

    One (C x V) buffer in forward and none more in backward (see ``_BucketLogProbs``); the
    tail is a sum over the other ids, not ``1 - sum``, so it keeps its precision when the
    k ids hold nearly all of the mass."""
    return _BucketLogProbs.apply(wide(s_logits_CV), ids_Ck.long())


def teacher_buckets(logprobs_Ck: torch.Tensor, ids_Ck: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """Teacher log-probs [C, k+1] in float64: the stored top-k and log(1 - their mass),
    floored (float64 keeps a tail of 1e-9 that float32 would round to 0). With ``ids``, a
    slot whose id is -1 (no student token) is -inf: its mass is the tail's."""
    lp = logprobs_Ck.double()
    if ids_Ck is not None:
        lp = lp.masked_fill(ids_Ck < 0, -math.inf)
    tail = (-torch.expm1(lp.logsumexp(-1, keepdim=True))).clamp_min(TAIL_FLOOR).log()
    return torch.cat([lp, tail], dim=-1)


def topk_loss(kind: str, s_logits_CV: torch.Tensor, ids_Ck: torch.Tensor,
              logprobs_Ck: torch.Tensor) -> torch.Tensor:
    log_q = student_buckets(s_logits_CV, ids_Ck)
    return divergence(kind, log_q, teacher_buckets(logprobs_Ck, ids_Ck).to(log_q.dtype))


def sampled_loss(s_logits_CV: torch.Tensor, tokens_C: torch.Tensor, teacher_lp_C: torch.Tensor,
                 rollout_lp_C: torch.Tensor) -> torch.Tensor:
    """Importance-weighted policy-gradient reverse KL on the sampled token."""
    lp_C = F.log_softmax(wide(s_logits_CV), -1).gather(-1, tokens_C.long()[:, None])[:, 0]
    advantage = -(lp_C - teacher_lp_C.to(lp_C.dtype)).detach()
    weight = torch.exp(lp_C - rollout_lp_C.to(lp_C.dtype))
    return -weight * advantage


def full_loss(kind: str, s_logits_CV: torch.Tensor, t_logits_CV: torch.Tensor) -> torch.Tensor:
    return divergence(kind, F.log_softmax(wide(s_logits_CV), -1),
                      F.log_softmax(wide(t_logits_CV), -1))


def token_loss(loss: str, s_logits_CV: torch.Tensor, targets: dict[str, torch.Tensor],
               t_logits_CV: torch.Tensor | None = None) -> torch.Tensor:
    """One loss value per position of a chunk (``loss``: a name of ``tipcli.catalog.LOSSES``)."""
    spec = LOSSES.get(loss)
    if spec is None:
        raise ValueError(f"unknown loss {loss!r}; one of {', '.join(LOSSES)}")
    if spec.form == "topk":
        return topk_loss(spec.divergence, s_logits_CV, targets["teacher_topk_ids"],
                         targets["teacher_topk_logprobs"])
    if spec.form == "sampled":
        return sampled_loss(s_logits_CV, targets["response_ids"], targets["teacher_logprob"],
                            targets["rollout_logprob"])
    if t_logits_CV is None:
        raise ValueError(f"{loss} needs teacher logits")
    return full_loss(spec.divergence, s_logits_CV, t_logits_CV)


def chunked_token_loss(loss: str, hidden_KH: torch.Tensor, head: Callable,
                       targets: dict[str, torch.Tensor], chunk_size: int,
                       t_hidden_KH: torch.Tensor | None = None,
                       t_head: Callable | None = None) -> torch.Tensor:
    """``loss_K`` from hidden states at kept positions, ``chunk_size`` rows of logits at a time.

    Each chunk runs under ``torch.utils.checkpoint``: only its hidden states are kept for
    backward, where its logits (and the teacher's, under no_grad) are rebuilt."""
    names = sorted(targets)

    def one_chunk(h_CH, th_CH, *values):
        chunk_targets = dict(zip(names, values))
        t_logits = None
        if th_CH is not None:
            with torch.no_grad():
                t_logits = t_head(th_CH).to(h_CH.device)
        return token_loss(loss, head(h_CH), chunk_targets, t_logits)

    parts = []
    for a in range(0, hidden_KH.shape[0], chunk_size):
        sl = slice(a, a + chunk_size)
        th = None if t_hidden_KH is None else t_hidden_KH[sl]
        values = [targets[n][sl] for n in names]
        parts.append(checkpoint(one_chunk, hidden_KH[sl], th, *values, use_reentrant=False))
    if not parts:
        return hidden_KH.new_zeros(0, dtype=torch.float32)
    return torch.cat(parts)
