"""Per-token statistics of two next-token distributions, exact and chunked.

For each position the student and teacher logits (real vocabulary only, divided by
the temperature) give ``p_s`` and ``p_t``; we compute the student and teacher
entropies, reverse KL ``KL(p_s||p_t)``, forward KL ``KL(p_t||p_s)``, JSD with
``m = (p_s + p_t) / 2``, the log-probs of the sampled token and the teacher's top-k.
Logits are built from hidden states ``chunk_size`` positions at a time, so no
(positions x V) float32 tensor for a whole batch ever exists.

Shape letters: P positions, C positions in a chunk, H hidden, V vocabulary, k top-k.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

STAT_NAMES = ("student_logprob", "teacher_logprob", "student_entropy", "teacher_entropy",
              "rkl", "fkl", "jsd")
LN2 = math.log(2.0)


AUTO_CHUNK_ELEMENTS = 1 << 22  # logits per chunk on the CPU when chunk_size is 0 (16 MB)
CHUNK_BUFFERS = 8         # float32 (C x V) buffers a chunk's statistics hold at most
GPU_CHUNK_SHARE = 0.25    # of a GPU's free memory, for one chunk's buffers
MAX_GPU_CHUNK = 8192      # positions: beyond this a chunk gains nothing on a GPU


def auto_chunk(chunk_size: int, vocab_size: int, device=None,
               free_bytes: int | None = None) -> int:
    """Positions per chunk: as given, or (0) sized for the device. On the CPU about 2^22
    logits per chunk, so the handful of (C x V) temporaries stays near 100 MB whatever V
    is. On a GPU a quarter of its free memory (``free_bytes``, read from the device when
    not given) for the chunk's float32 buffers, up to ``MAX_GPU_CHUNK`` positions: at
    V = 151,936, 27 positions a chunk would launch thousands of small matmuls a batch."""
    if chunk_size > 0:
        return chunk_size
    cpu_size = max(1, AUTO_CHUNK_ELEMENTS // vocab_size)
    if device is None or torch.device(device).type != "cuda":
        return cpu_size
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(torch.device(device))[0]
    fits = int(free_bytes * GPU_CHUNK_SHARE) // (CHUNK_BUFFERS * 4 * vocab_size)
    return max(cpu_size, min(fits, MAX_GPU_CHUNK))


def _dot(a_CV: torch.Tensor, b_CV: torch.Tensor, scratch_CV: torch.Tensor) -> torch.Tensor:
    """Row-wise sum of a * b, the product written into ``scratch`` (no new allocation).

    ``sum`` reduces with cascade summation, so a float32 sum over a 150k vocabulary stays
    within 1e-5 of float64; a BLAS dot product (``bmm``) accumulates sequentially and
    drifts by ~1e-4 there."""
    return torch.mul(a_CV, b_CV, out=scratch_CV).sum(-1)


def _log_softmax_(logits_CV: torch.Tensor, inplace: bool) -> torch.Tensor:
    """log-softmax in float32, floored at -1e30; overwrites float32 logits if ``inplace``."""
    x = logits_CV.float()
    if x.data_ptr() == logits_CV.data_ptr() and not inplace:
        x = x.clone()
    x = x.contiguous()
    return x.sub_(x.logsumexp(-1, keepdim=True)).clamp_min_(-1e30)


def chunk_stats(s_logits_CV: torch.Tensor, t_logits_CV: torch.Tensor, tokens_C: torch.Tensor,
                top_k: int = 0, inplace: bool = False) -> dict[str, torch.Tensor]:
    """Statistics of one chunk; logits already restricted to V and divided by temperature.

    With ``inplace`` the logits are overwritten (for a fresh chunk used once). Four (C x V)
    buffers are allocated beyond the logits (``ps``, ``pt``, the log-ratio and a scratch
    product); every other step writes into one of them. Log-probs are floored at -1e30 so a
    -inf logit (p = 0) adds 0 instead of nan."""
    ls, lt = _log_softmax_(s_logits_CV, inplace), _log_softmax_(t_logits_CV, inplace)
    ps, pt = ls.exp(), lt.exp()
    scratch = torch.empty_like(ls)
    idx = tokens_C.long().unsqueeze(-1)
    out = {
        "student_logprob": ls.gather(-1, idx).squeeze(-1),
        "teacher_logprob": lt.gather(-1, idx).squeeze(-1),
        "student_entropy": _dot(ps, ls, scratch).neg_(),
        "teacher_entropy": _dot(pt, lt, scratch).neg_(),
    }
    log_ratio = torch.sub(ls, lt)
    out["rkl"] = _dot(ps, log_ratio, scratch).clamp_min_(0)
    out["fkl"] = _dot(pt, log_ratio, scratch).neg_().clamp_min_(0)
    if top_k > 0:
        vals, ids = lt.topk(min(top_k, lt.shape[-1]), dim=-1)
        out["teacher_topk_ids"] = ids.to(torch.int32)
        out["teacher_topk_logprobs"] = vals
    lm = torch.logaddexp(ls, lt, out=log_ratio).sub_(LN2)  # log of m = (p_s + p_t) / 2
    jsd = _dot(ps, ls.sub_(lm), scratch) + _dot(pt, lt.sub_(lm), scratch)
    out["jsd"] = jsd.mul_(0.5).clamp_(0, LN2)
    return out


@torch.no_grad()
def token_stats(s_hidden_PH: torch.Tensor, t_hidden_PH: torch.Tensor, tokens_P: torch.Tensor,
                s_logits: Callable, t_logits: Callable, top_k: int = 0,
                chunk_size: int = 1024) -> dict[str, torch.Tensor]:
    """All statistics for P positions, computed ``chunk_size`` positions at a time; the
    chunks' results stay on the device and reach the host together (one copy a field)."""
    parts: dict[str, list[torch.Tensor]] = {}
    tokens_P = tokens_P.to(s_hidden_PH.device)
    for a in range(0, tokens_P.shape[0], chunk_size):
        b = a + chunk_size
        s_chunk = s_logits(s_hidden_PH[a:b])
        st = chunk_stats(s_chunk, t_logits(t_hidden_PH[a:b]).to(s_chunk.device),
                         tokens_P[a:b], top_k, inplace=True)
        for k, v in st.items():
            parts.setdefault(k, []).append(v)
    if not parts:
        return empty_stats(top_k)
    return {k: torch.cat(v).cpu() for k, v in parts.items()}


def empty_stats(top_k: int) -> dict[str, torch.Tensor]:
    out = {k: torch.zeros(0) for k in STAT_NAMES}
    if top_k > 0:
        out["teacher_topk_ids"] = torch.zeros(0, top_k, dtype=torch.int32)
        out["teacher_topk_logprobs"] = torch.zeros(0, top_k)
    return out


@torch.no_grad()
def served_stats(s_hidden_PH: torch.Tensor, tokens_P: torch.Tensor, s_logits: Callable,
                 teacher: dict[str, torch.Tensor], chunk_size: int = 1024
                 ) -> dict[str, torch.Tensor]:
    """The statistics of P positions when the teacher is served (``tipcli.engines.served``): its
    sampled-token log-prob and top-k come from the server (exact), the student's side is
    computed here (exact), and the divergences are estimated over the teacher's top-k and
    one tail bucket on each side (as the ``*-topk`` losses; a lower bound of the exact
    ones). There is no teacher entropy: the server does not give its distribution."""
    from tipcli.ops.losses import divergence, student_buckets, teacher_buckets

    parts: dict[str, list[torch.Tensor]] = {}
    for a in range(0, tokens_P.shape[0], chunk_size):
        b = a + chunk_size
        logits = s_logits(s_hidden_PH[a:b]).float()
        ids = teacher["teacher_topk_ids"][a:b].to(logits.device).long()
        log_q = student_buckets(logits, ids)
        log_r = teacher_buckets(teacher["teacher_topk_logprobs"][a:b].to(logits.device))
        log_r = log_r.to(log_q.dtype)
        # the student's side exactly as chunk_stats computes it (the same numbers, bit for bit)
        ls = _log_softmax_(logits, inplace=True)
        out = {"student_logprob": ls.gather(-1, tokens_P[a:b].to(ls.device).long()[:, None])
               .squeeze(-1),
               "student_entropy": _dot(ls.exp(), ls, torch.empty_like(ls)).neg_(),
               **{kind: divergence(kind, log_q, log_r).clamp_min(0)
                  for kind in ("rkl", "fkl", "jsd")}}
        for k, v in out.items():
            parts.setdefault(k, []).append(v.float().cpu())
    stats = {k: torch.cat(v) for k, v in parts.items()} if parts else \
        {k: torch.zeros(0) for k in ("student_logprob", "student_entropy", "rkl", "fkl", "jsd")}
    return {**stats, **{k: teacher[k] for k in ("teacher_logprob", "teacher_topk_ids",
                                                "teacher_topk_logprobs")}}


@torch.no_grad()
def student_side(s_hidden_PH: torch.Tensor, tokens_P: torch.Tensor, s_logits: Callable,
                 chunk_size: int = 1024, ids_Pk: torch.Tensor | None = None
                 ) -> dict[str, torch.Tensor]:
    """The student's log-prob of each token and its entropy, exactly as ``chunk_stats``
    computes them, ``chunk_size`` positions at a time (a teacher whose distribution is not
    over the student's vocabulary gives the rest); with ``ids_Pk`` also its log-probs of
    those ids (``gathered``; an id < 0 gives -inf)."""
    names = ("student_logprob", "student_entropy") + (("gathered",) if ids_Pk is not None
                                                      else ())
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in names}
    for a in range(0, tokens_P.shape[0], chunk_size):
        ls = _log_softmax_(s_logits(s_hidden_PH[a:a + chunk_size]), inplace=True)
        idx = tokens_P[a:a + chunk_size].to(ls.device).long()[:, None]
        parts["student_logprob"].append(ls.gather(-1, idx).squeeze(-1).float().cpu())
        if ids_Pk is not None:
            ids = ids_Pk[a:a + chunk_size].to(ls.device).long()
            got = ls.gather(-1, ids.clamp_min(0))
            parts["gathered"].append(got.masked_fill_(ids < 0, -math.inf).float().cpu())
        parts["student_entropy"].append(_dot(ls.exp(), ls, torch.empty_like(ls)).neg_()
                                        .float().cpu())
    return {k: torch.cat(v) if v else torch.zeros((0,) + ((ids_Pk.shape[1],) if
                                                          k == "gathered" else ()))
            for k, v in parts.items()}


SERVED_STATISTICS = {"student_logprob": "exact", "teacher_logprob": "exact",
                     "student_entropy": "exact", "teacher_entropy": "absent",
                     "rkl": "top-k estimate", "fkl": "top-k estimate", "jsd": "top-k estimate",
                     "teacher_topk": "exact"}
EXACT_STATISTICS = dict.fromkeys(SERVED_STATISTICS, "exact")
