"""Token importance: normalised entropy h, divergence d, Soft-OR, quadrants and masks.

    tip select runs/score --strategy soft-or --keep 0.5 --divergence rkl -o runs/select

Pure, vectorised torch functions over flat per-token tensors (no loop over tokens or
sequences). Shape letters: T tokens, C candidate tokens (``response_mask`` true), N
sequences, G normalisation groups, R rows of a segment (a sequence or a group), L the
padded row width, K kept tokens.

Conventions (see docs/selection.md):

- A *group* is ``group_size`` consecutive sequences (``group_T = seq_T // group_size``);
  group statistics use the group's candidate tokens only.
- ``minmax``: entropy clipped at the group's 98th percentile (``torch.quantile``,
  linear), then entropy and divergence min-max scaled to [0, 1] over the group; a
  constant column maps to 0. ``bound``: ``h = H / ln V``; ``d = jsd / ln 2`` or
  ``1 - exp(-KL)``. ``rank``: mid-rank of ties / (n - 1) within the group (0 when n = 1).
- Thresholds default to the group medians (``torch.quantile(x, 0.5)``, linear) of h and d.
  "High" means ``>= threshold``: Q1 = high h, high d; Q2 = high h, low d;
  Q3 = low h, high d; Q4 = low h, low d (codes 1..4).
- Non-candidate tokens get ``h = d = soft_or = 0``, quadrant 4 and are never selected.
- Top-K strategies keep exactly ``K = max(1, floor(keep * m + 1e-9))`` tokens of each
  scope with m > 0 candidates (the 1e-9 absorbs float error, so 0.29 x 100 keeps 29).
  Ties are broken by a seeded bijective hash of the token index, sampling uses a seeded
  ``torch.Generator``: the same inputs and seed give the same mask, bit for bit.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from tipcli.catalog import strategy
from tipcli.configs import NORMALIZERS, Selection

CLIP_QUANTILE = 0.98
KEEP_EPS = 1e-9


# ----------------------------------------------------------------------------- segments


@dataclass(frozen=True)
class Rows:
    """Candidate tokens laid out in contiguous rows (sequences or groups)."""

    row_C: torch.Tensor      # int64 [C] row of each candidate, non-decreasing
    pos_C: torch.Tensor      # int64 [C] position of the candidate inside its row
    count_R: torch.Tensor    # int64 [R] candidates per row

    @classmethod
    def build(cls, row_C: torch.Tensor, num_rows: int) -> Rows:
        """Rows from the (non-decreasing) row of every candidate."""
        count_R = torch.bincount(row_C, minlength=num_rows)
        return cls.from_offsets(torch.cat([count_R.new_zeros(1), count_R.cumsum(0)]), row_C)

    @classmethod
    def from_offsets(cls, off_R1: torch.Tensor, row_C: torch.Tensor | None = None) -> Rows:
        """Rows from candidate offsets [R+1] (row r is ``off_R1[r]:off_R1[r+1]``)."""
        count_R = off_R1.diff()
        if row_C is None:
            row_C = torch.repeat_interleave(torch.arange(count_R.numel()), count_R)
        pos_C = torch.arange(row_C.numel()).sub_(off_R1[:-1].index_select(0, row_C))
        return cls(row_C, pos_C, count_R)

    def expand(self, v_R: torch.Tensor) -> torch.Tensor:
        """[C]: each candidate's row value."""
        return v_R.index_select(0, self.row_C)

    @property
    def num_rows(self) -> int:
        return self.count_R.numel()


def sequence_index(offsets_N1: torch.Tensor) -> torch.Tensor:
    """int64 [T]: the sequence of each token, from response offsets [N+1]."""
    lengths_N = offsets_N1.diff()
    return torch.repeat_interleave(torch.arange(lengths_N.numel()), lengths_N)


def _fills(dtype: torch.dtype) -> tuple[float | int, float | int]:
    if dtype.is_floating_point:
        return -math.inf, math.inf
    info = torch.iinfo(dtype)
    return info.min, info.max


def row_kth(values_C: torch.Tensor, rows: Rows, k_R: torch.Tensor) -> torch.Tensor:
    """The 0-based ``k_R``-th smallest value of each row (garbage for empty rows)."""
    return _kth_grid(values_C, rows, k_R)[0]


def _kth_grid(values_C: torch.Tensor, rows: Rows, k_R: torch.Tensor):
    """(k-th smallest [R], the padded grid [R, L], its -inf lead per row [R]).

    One ``torch.kthvalue`` over a padded [R, L] grid: row r holds ``k0 - k_r`` copies of
    -inf before its values and +inf after them, so position k0 holds its k-th smallest."""
    k_R = torch.minimum(k_R.clamp(min=0), (rows.count_R - 1).clamp(min=0))
    k0 = int(k_R.max()) if k_R.numel() else 0
    lead_R = k0 - k_R
    width = max(int((lead_R + rows.count_R).max()) if k_R.numel() else 0, k0 + 1)
    lo, hi = _fills(values_C.dtype)
    grid_RL = torch.full((rows.num_rows, width), hi, dtype=values_C.dtype)
    grid_RL[:, :k0] = lo  # a row's values start at its lead <= k0 and end past k0
    start_R = torch.arange(rows.num_rows) * width + lead_R
    grid_RL.view(-1).index_copy_(0, rows.expand(start_R) + rows.pos_C, values_C)
    return torch.kthvalue(grid_RL, k0 + 1, dim=1).values, grid_RL, lead_R


def row_quantile(values_C: torch.Tensor, rows: Rows, q: float) -> torch.Tensor:
    """float32 [R]: ``torch.quantile(row, q)`` (linear) of every row, 0 for empty rows.

    Same arithmetic as torch.quantile: float32 ranks, the two neighbouring order
    statistics ``a <= b``, ``lerp(a, b, rank - floor(rank))``."""
    values_C = values_C.float()
    n_R = rows.count_R
    rank_R = torch.tensor(q, dtype=torch.float32) * (n_R - 1).clamp(min=0).float()
    below_R = rank_R.long()
    from_top_R = (n_R - 1 - below_R).clamp(min=0)
    width = int(n_R.max()) if n_R.numel() else 0
    if width and int(from_top_R.max()) + 2 <= max(width // 16, 2):
        a_R, b_R = _top_pair(values_C, rows, from_top_R, width)
    else:
        a_R, b_R = _kth_pair(values_C, rows, below_R)
    b_R = torch.where(rank_R.ceil() == below_R, a_R, b_R)
    return torch.where(n_R > 0, torch.lerp(a_R, b_R, rank_R - below_R), torch.zeros_like(a_R))


def _kth_pair(values_C: torch.Tensor, rows: Rows, below_R: torch.Tensor):
    """Order statistics ``below`` and ``below + 1`` (0-based, ascending) of each row: the
    upper one is the lower one when enough values tie with it, else the next value up."""
    a_R, grid_RL, lead_R = _kth_grid(values_C, rows, below_R)
    le_R = (grid_RL <= a_R[:, None]).sum(1) - lead_R  # the -inf lead is not a value
    next_R = torch.where(grid_RL > a_R[:, None], grid_RL, math.inf).amin(1)
    return a_R, torch.where(le_R > below_R + 1, a_R, next_R)


def _top_pair(values_C: torch.Tensor, rows: Rows, from_top_R: torch.Tensor, width: int):
    """The same pair for high quantiles, from one ``torch.topk`` of the largest values."""
    grid_RL = torch.full((rows.num_rows, width), -math.inf)
    start_R = torch.arange(rows.num_rows) * width
    grid_RL.view(-1).index_copy_(0, rows.expand(start_R) + rows.pos_C, values_C)
    top_Rk = grid_RL.topk(int(from_top_R.max()) + 1, dim=1).values
    a_R = top_Rk.gather(1, from_top_R[:, None]).squeeze(1)
    b_R = top_Rk.gather(1, (from_top_R - 1).clamp(min=0)[:, None]).squeeze(1)
    return a_R, b_R


def row_min_max(values_C: torch.Tensor, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
    lo_R = torch.full((rows.num_rows,), math.inf).scatter_reduce_(0, rows.row_C, values_C,
                                                                  "amin")
    hi_R = torch.full((rows.num_rows,), -math.inf).scatter_reduce_(0, rows.row_C, values_C,
                                                                   "amax")
    return lo_R, hi_R


# ----------------------------------------------------------------------------- normalisation


def minmax_scale(values_C: torch.Tensor, rows: Rows) -> torch.Tensor:
    """Min-max scale each row to [0, 1]; a constant row maps to 0 (divided by +inf)."""
    lo_R, hi_R = row_min_max(values_C, rows)
    span_R = hi_R - lo_R
    span_R = torch.where(span_R > 0, span_R, torch.full_like(span_R, math.inf))
    return (values_C - rows.expand(lo_R)).div_(rows.expand(span_R))


def minmax_entropy(H_C: torch.Tensor, rows: Rows) -> torch.Tensor:
    """The paper's h: clip at the row's 98th percentile, then min-max scale."""
    clip_R = row_quantile(H_C, rows, CLIP_QUANTILE)
    return minmax_scale(torch.minimum(H_C, rows.expand(clip_R)), rows)


def rank_scale(values_C: torch.Tensor, rows: Rows) -> torch.Tensor:
    """Mid-rank of ties within the row, divided by (n - 1); 0 for a single value."""
    width = int(rows.count_R.max()) if rows.num_rows else 0
    grid_RL = torch.full((rows.num_rows, width), math.inf)
    grid_RL[rows.row_C, rows.pos_C] = values_C
    sorted_RL = grid_RL.sort(dim=1).values
    left_RL = torch.searchsorted(sorted_RL, grid_RL, right=False)
    right_RL = torch.searchsorted(sorted_RL, grid_RL, right=True)
    mid_C = (left_RL + right_RL - 1)[rows.row_C, rows.pos_C].float() / 2
    denom_C = rows.expand((rows.count_R - 1).clamp(min=1)).float()
    return mid_C / denom_C


def bound_scale(H_C: torch.Tensor, D_C: torch.Tensor, divergence: str,
                vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-free h = H / ln V and d = jsd / ln 2 or 1 - exp(-KL), clamped to [0, 1]."""
    h_C = H_C / math.log(max(vocab_size, 2))
    if divergence == "jsd":
        d_C = D_C / math.log(2)
    else:
        d_C = -torch.expm1(-D_C.clamp(min=0))
    return h_C.clamp(0, 1), d_C.clamp(0, 1)


def normalize(H_C: torch.Tensor, D_C: torch.Tensor, rows: Rows, method: str,
              divergence: str = "rkl", vocab_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(h_C, d_C) in [0, 1] for candidate tokens grouped by ``rows`` (the groups)."""
    H_C, D_C = H_C.float(), D_C.float()
    if method == "minmax":
        return both(lambda: minmax_entropy(H_C, rows), lambda: minmax_scale(D_C, rows))
    if method == "bound":
        return bound_scale(H_C, D_C, divergence, vocab_size)
    if method == "rank":
        return both(lambda: rank_scale(H_C, rows), lambda: rank_scale(D_C, rows))
    raise ValueError(f"unknown normalisation {method!r}; use one of {', '.join(NORMALIZERS)}")


def soft_or(h: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """s = h + d - h*d, in [0, 1] when h and d are."""
    return h + d - h * d


def quadrant(h: torch.Tensor, d: torch.Tensor, tau_h: torch.Tensor,
             tau_d: torch.Tensor) -> torch.Tensor:
    """uint8 1..4 with "high" = ``>= threshold``: Q1 hh/hd, Q2 hh/ld, Q3 lh/hd, Q4 lh/ld."""
    low_h = (h < tau_h).to(torch.uint8)
    low_d = (d < tau_d).to(torch.uint8)
    return 1 + 2 * low_h + low_d


# ----------------------------------------------------------------------------- selection


def budget(count_R: torch.Tensor, keep: float) -> torch.Tensor:
    """K per scope: max(1, floor(keep * m + 1e-9)) for m > 0, else 0."""
    k_R = torch.floor(count_R.double() * keep + KEEP_EPS).long().clamp(min=1)
    return torch.where(count_R > 0, torch.minimum(k_R, count_R), torch.zeros_like(k_R))


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijection of [0, 2^32) (murmur3's finaliser) on int64 tensors."""
    m = 0xFFFFFFFF
    x = x & m
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & m
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & m
    return x ^ (x >> 16)


def tiebreak(index_I: torch.Tensor, seed: int) -> torch.Tensor:
    """int64 [I]: seeded pseudo-random values in [0, 2^32), distinct for distinct indices."""
    salt = int(mix32(torch.tensor([seed * 0x9E3779B9 + 0x7F4A7C15])).item())
    return mix32(index_I + salt)


def top_k_mask(score_C: torch.Tensor, rows: Rows, k_R: torch.Tensor, seed: int) -> torch.Tensor:
    """bool [C]: the ``k_R`` highest scores of each row (exactly min(k, m) of them).

    The k-th largest score is the cut. Where several tokens tie at the cut, the surplus
    is dropped by a seeded bijective hash of the token index (distinct keys), so the count
    is exact. Scores must not be NaN."""
    score_C = score_C.float()
    k_R = torch.minimum(k_R, rows.count_R)
    cut_C = rows.expand(row_kth(score_C, rows, rows.count_R - k_R))
    keep_C = score_C >= cut_C
    surplus_R = segment_count(keep_C, rows) - k_R
    if bool((surplus_R > 0).any()):
        tie_I = ((score_C == cut_C) & rows.expand(surplus_R > 0)).nonzero().squeeze(1)
        ties = Rows.build(rows.row_C[tie_I], rows.num_rows)
        key_I = tiebreak(tie_I, seed)
        drop_I = key_I < row_kth(key_I, ties, surplus_R.clamp(min=0))[ties.row_C]
        keep_C[tie_I[drop_I & (surplus_R[ties.row_C] > 0)]] = False
    return keep_C


def segment_count(flag_C: torch.Tensor, rows: Rows) -> torch.Tensor:
    """int64 [R]: how many flags are true in each row."""
    counts_R = torch.zeros(rows.num_rows, dtype=torch.int32)
    return counts_R.index_add_(0, rows.row_C, flag_C.to(torch.int32)).long()


def gumbel(n: int, seed: int) -> torch.Tensor:
    """float32 [n] standard Gumbel noise from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=gen).clamp_(min=1e-30)
    return u.log_().neg_().log_().neg_()


def _entropy_sample_key(h_C, alpha: float, seed: int) -> torch.Tensor:
    """Gumbel top-K: sampling without replacement with probability proportional to h^alpha."""
    logw_C = alpha * torch.log(h_C) if alpha != 0 else torch.zeros_like(h_C)
    return logw_C + gumbel(h_C.numel(), seed)


# what each strategy's ``ranks`` (tipcli.catalog) means: (h, d, soft_or, fkl, alpha, seed) -> key
RANK_KEYS = {
    "gumbel": lambda h, d, s, fkl, alpha, seed: gumbel(h.numel(), seed),
    "h": lambda h, d, s, fkl, alpha, seed: h,
    "h^alpha+gumbel": lambda h, d, s, fkl, alpha, seed: _entropy_sample_key(h, alpha, seed),
    "d": lambda h, d, s, fkl, alpha, seed: d,
    "soft_or": lambda h, d, s, fkl, alpha, seed: s,
    "-soft_or": lambda h, d, s, fkl, alpha, seed: -s,
    "fkl*(1-h)": lambda h, d, s, fkl, alpha, seed: fkl.float() * (1 - h),
}


def select_mask(name: str, keep: float, h_C, d_C, s_C, quad_C, fkl_C, scope: Rows,
                alpha: float = 1.0, seed: int = 0) -> torch.Tensor:
    """bool [C]: the candidate tokens strategy ``name`` keeps, budgeted per ``scope`` row."""
    st = strategy(name)
    if not st.budgeted:
        return torch.ones_like(h_C, dtype=torch.bool)
    k_R = budget(scope.count_R, keep)
    score_C = RANK_KEYS[st.ranks](h_C, d_C, s_C, fkl_C, alpha, seed)
    if not st.quadrants:
        return top_k_mask(score_C, scope, k_R, seed)
    inside_C = torch.isin(quad_C, torch.tensor(sorted(st.quadrants), dtype=quad_C.dtype))
    sub = Rows.build(scope.row_C[inside_C], scope.num_rows)
    out_C = torch.zeros_like(inside_C)
    out_C[inside_C] = top_k_mask(score_C[inside_C], sub, k_R, seed)
    return out_C


# ----------------------------------------------------------------------------- whole pass


def token_importance(offsets_N1: torch.Tensor, mask_T: torch.Tensor, entropy_T: torch.Tensor,
                     div_T: torch.Tensor, fkl_T: torch.Tensor, st: Selection, seed: int = 0,
                     vocab_size: int = 0, segments: list[int] | None = None
                     ) -> dict[str, torch.Tensor]:
    """Per-token h, d, soft_or, quadrant and selected (all [T]) plus per-group tau_h, tau_d [G].

    ``offsets_N1`` are the response offsets of the whole directory in sequence order;
    groups of ``group_size`` consecutive sequences may span shards, never the starts of
    ``segments`` (sequence indices: several teachers' runs)."""
    cand_T = mask_T.bool()
    every = bool(cand_T.all())
    pick = (lambda x_T: x_T) if every else (lambda x_T: x_T[cand_T])
    seqs, groups = layout(offsets_N1, cand_T, st.group_size, segments)
    h_C, d_C = normalize(pick(entropy_T), pick(div_T), groups, st.normalize, st.divergence,
                         vocab_size)
    s_C = soft_or(h_C, d_C)

    def quadrants():
        tau_h_G, tau_d_G = both(lambda: _threshold(h_C, groups, st.tau_h),
                                lambda: _threshold(d_C, groups, st.tau_d))
        return tau_h_G, tau_d_G, quadrant(h_C, d_C, groups.expand(tau_h_G),
                                          groups.expand(tau_d_G))

    def select(quad_C):
        scope = seqs if st.scope == "sequence" else groups
        return select_mask(st.strategy, st.keep, h_C, d_C, s_C, quad_C, pick(fkl_T), scope,
                           st.alpha, seed)

    if not strategy(st.strategy).quadrants:  # the mask does not need the quadrants
        sel_C, (tau_h_G, tau_d_G, quad_C) = both(lambda: select(None), quadrants)
    else:
        tau_h_G, tau_d_G, quad_C = quadrants()
        sel_C = select(quad_C)
    out = {name: v_C if every else _scatter(v_C, cand_T, fill) for name, v_C, fill in
           (("h", h_C, 0), ("d", d_C, 0), ("soft_or", s_C, 0), ("quadrant", quad_C, 4),
            ("selected", sel_C, False))}
    return {**out, "tau_h": tau_h_G, "tau_d": tau_d_G}


def layout(offsets_N1: torch.Tensor, cand_T: torch.Tensor, group_size: int,
           segments: list[int] | None = None) -> tuple[Rows, Rows]:
    """Candidate tokens as rows of sequences and rows of groups of ``group_size`` sequences,
    counted afresh from each start of ``segments``."""
    if bool(cand_T.all()):
        cand_off_N1 = offsets_N1
    else:
        cand_off_N1 = torch.cat([offsets_N1.new_zeros(1), cand_T.long().cumsum(0)])[offsets_N1]
    num_seq = offsets_N1.numel() - 1
    starts = sorted({0, *(s for s in segments or () if 0 < s < num_seq)})
    edges = torch.cat([torch.arange(a, b, group_size) for a, b in
                       zip(starts, [*starts[1:], num_seq])] + [torch.tensor([num_seq])])
    return both(lambda: Rows.from_offsets(cand_off_N1),
                lambda: Rows.from_offsets(cand_off_N1[edges]))


def both(fa, fb):
    """(fa(), fb()) computed on two threads: torch releases the GIL inside its ops, and
    kthvalue / topk run on one core, so independent halves overlap."""
    with ThreadPoolExecutor(1) as pool:
        a = pool.submit(fa)
        b = fb()
        return a.result(), b


def _threshold(x_C: torch.Tensor, groups: Rows, absolute: float | None) -> torch.Tensor:
    if absolute is not None:
        return torch.full((groups.num_rows,), float(absolute))
    return row_quantile(x_C, groups, 0.5)


def _scatter(v_C: torch.Tensor, cand_T: torch.Tensor, fill) -> torch.Tensor:
    out_T = torch.full(cand_T.shape, fill, dtype=v_C.dtype)
    out_T[cand_T] = v_C
    return out_T
