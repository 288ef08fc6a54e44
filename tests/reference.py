"""Plain, unchunked textbook formulas in float64: the references that the chunked and
fused computations of tip are held against in tests and benchmarks."""

from __future__ import annotations

import torch

from tipcli.catalog import LOSSES


def reference_stats(s_logits_PV: torch.Tensor, t_logits_PV: torch.Tensor,
                    tokens_P: torch.Tensor) -> dict[str, torch.Tensor]:
    """The textbook definitions in float64, unchunked: the reference for tests and benchmarks."""
    ps = torch.softmax(s_logits_PV.double(), -1)
    pt = torch.softmax(t_logits_PV.double(), -1)
    m = (ps + pt) / 2

    def kl(p, q):
        return (p * (p.log() - q.log())).nan_to_num(0.0).sum(-1)

    idx = tokens_P.long().unsqueeze(-1)
    return {
        "student_logprob": ps.log().gather(-1, idx).squeeze(-1),
        "teacher_logprob": pt.log().gather(-1, idx).squeeze(-1),
        "student_entropy": -(ps * ps.log()).nan_to_num(0.0).sum(-1),
        "teacher_entropy": -(pt * pt.log()).nan_to_num(0.0).sum(-1),
        "rkl": kl(ps, pt),
        "fkl": kl(pt, ps),
        "jsd": 0.5 * kl(ps, m) + 0.5 * kl(pt, m),
    }


def reference_token_loss(loss: str, s_logits_KV: torch.Tensor, targets: dict[str, torch.Tensor],
                         t_logits_KV: torch.Tensor | None = None) -> torch.Tensor:
    """The textbook formulas on full logits, in the logits' dtype (float64 in tests): the
    reference the chunked path is held against."""

    ls = torch.log_softmax(s_logits_KV, -1)
    ps = ls.exp()
    kind, form = LOSSES[loss].divergence, LOSSES[loss].form
    if form == "topk":
        ids = targets["teacher_topk_ids"].long()
        lt = targets["teacher_topk_logprobs"].to(ls.dtype)
        q_k = ps.gather(-1, ids)
        q = torch.cat([q_k, (1 - q_k.sum(-1, keepdim=True))], -1)
        r = torch.cat([lt.exp(), 1 - lt.exp().sum(-1, keepdim=True)], -1)
        return _reference_divergence(kind, q, r)
    if loss == "rkl-sampled":
        lp = ls.gather(-1, targets["response_ids"].long()[:, None])[:, 0]
        w = torch.exp(lp - targets["rollout_logprob"].to(lp.dtype))
        return w * (lp - targets["teacher_logprob"].to(lp.dtype)).detach()
    return _reference_divergence(kind, ps, torch.softmax(t_logits_KV.to(ls.dtype), -1))


def _reference_divergence(kind: str, q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if kind == "rkl":
        return kl(q, r)
    if kind == "fkl":
        return kl(r, q)
    m = (q + r) / 2
    return 0.5 * kl(q, m) + 0.5 * kl(r, m)
