"""Importance functions against plain references written with Python loops."""

import itertools
import math

import pytest
import torch

from tipcli import catalog
from tipcli.catalog import strategy_problem
from tipcli.configs import Selection
from tipcli.ops.selection import (
    Rows,
    budget,
    normalize,
    row_quantile,
    select_mask,
    token_importance,
)

TOPK = ("entropy", "divergence", "soft-or", "soft-or-bottom", "q3")


def make_batch(seed=0, n_seq=11, max_len=9, masked=True):
    """Random ragged data: offsets [N+1], mask, entropy, rkl, fkl (some zero lengths)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len, (n_seq,), generator=g)
    off = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    T = int(off[-1])
    mask = torch.rand(T, generator=g) > 0.15 if masked else torch.ones(T, dtype=torch.bool)
    H = torch.rand(T, generator=g) * 4
    H[torch.rand(T, generator=g) < 0.1] = 9.0  # outliers the 98th-percentile clip cuts
    return off, mask, H, torch.rand(T, generator=g) ** 2, torch.rand(T, generator=g)


# ----------------------------------------------------------------------------- reference


def ref_normalize(off, mask, H, D, group_size):
    """minmax h and d (dict token -> value), tau per token, quadrant per token."""
    n_seq = len(off) - 1
    h, d, tau = {}, {}, {}
    for g0 in range(0, n_seq, group_size):
        toks = [t for i in range(g0, min(g0 + group_size, n_seq))
                for t in range(int(off[i]), int(off[i + 1])) if mask[t]]
        if not toks:
            continue
        hv = torch.tensor([float(H[t]) for t in toks])
        clip = torch.quantile(hv, 0.98)
        hv = torch.minimum(hv, clip)
        dv = torch.tensor([float(D[t]) for t in toks])
        hs = [scale(x, hv) for x in hv]
        ds = [scale(x, dv) for x in dv]
        th, td = torch.quantile(torch.tensor(hs), 0.5), torch.quantile(torch.tensor(ds), 0.5)
        for t, a, b in zip(toks, hs, ds):
            h[t], d[t], tau[t] = a, b, (float(th), float(td))
    return h, d, tau


def scale(x, col):
    lo, hi = float(col.min()), float(col.max())
    return 0.0 if hi == lo else float((x - lo) / (hi - lo))


def ref_quadrant(h, d, th, td):
    if h >= th:
        return 1 if d >= td else 2
    return 3 if d >= td else 4


def ref_scopes(off, mask, group_size, scope):
    n_seq = len(off) - 1
    step = 1 if scope == "sequence" else group_size
    return [[t for i in range(a, min(a + step, n_seq)) for t in range(int(off[i]), int(off[i + 1]))
             if mask[t]] for a in range(0, n_seq, step)]


def ref_k(m, keep):
    return 0 if m == 0 else min(m, max(1, math.floor(m * keep + 1e-9)))


def ref_key(strategy, t, h, d, fkl):
    s = h[t] + d[t] - h[t] * d[t]
    return {"entropy": h[t], "divergence": d[t], "soft-or": s, "soft-or-bottom": -s,
            "q3": float(fkl[t]) * (1 - h[t])}[strategy]


# ----------------------------------------------------------------------------- tests


def test_row_quantile_equals_torch_quantile_with_ties():
    g = torch.Generator().manual_seed(1)
    counts = torch.tensor([1, 2, 3, 7, 0, 50, 4])
    row = torch.repeat_interleave(torch.arange(7), counts)
    for values in (torch.rand(row.numel(), generator=g),
                   torch.randint(0, 3, (row.numel(),), generator=g).float()):
        rows = Rows.build(row, 7)
        for q in (0.0, 0.3, 0.5, 0.98, 1.0):
            got = row_quantile(values, rows, q)
            for r in range(7):
                if counts[r]:
                    assert got[r] == torch.quantile(values[row == r], q), (q, r)


def test_minmax_against_hand_computed_group():
    # 98th percentile of [1, 2, 3, 4, 100]: rank 0.98 * 4 = 3.92 -> 4 + 0.92 * 96 = 92.32
    H = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])
    D = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5])  # constant column -> 0
    rows = Rows.build(torch.zeros(5, dtype=torch.long), 1)
    h, d = normalize(H, D, rows, "minmax")
    expected = torch.tensor([0.0, 1.0, 2.0, 3.0, 91.32]) / 91.32
    assert torch.allclose(h, expected, atol=1e-6)
    assert h[-1] == 1.0 and h[0] == 0.0
    assert torch.equal(d, torch.zeros(5))


def test_bound_and_rank_normalisation():
    H = torch.tensor([0.0, math.log(100), 2.0, 2.0])
    D = torch.tensor([0.0, 1.0, math.log(2), 0.3])
    rows = Rows.build(torch.zeros(4, dtype=torch.long), 1)
    h, d = normalize(H, D, rows, "bound", "rkl", vocab_size=100)
    assert torch.allclose(h, torch.tensor([0.0, 1.0, 2 / math.log(100), 2 / math.log(100)]))
    assert torch.allclose(d, 1 - torch.exp(-D))
    _, dj = normalize(H, D, rows, "bound", "jsd", vocab_size=100)
    assert torch.allclose(dj, (D / math.log(2)).clamp(max=1))  # jsd <= ln 2; 1.0 clamps
    hr, dr = normalize(H, D, rows, "rank")
    # ranks 0, 3, {1, 2} tied -> 1.5; over n - 1 = 3
    assert torch.allclose(hr, torch.tensor([0.0, 1.0, 0.5, 0.5]))
    assert torch.allclose(dr, torch.tensor([0.0, 1.0, 2 / 3, 1 / 3]))


@pytest.mark.parametrize("group_size", [1, 3, 64])
def test_h_d_thresholds_quadrants_against_reference(group_size):
    off, mask, H, D, F = make_batch(seed=group_size)
    out = token_importance(off, mask, H, D, F, Selection(group_size=group_size))
    h, d, tau = ref_normalize(off, mask, H, D, group_size)
    for t in range(len(mask)):
        if not mask[t]:
            assert out["quadrant"][t] == 4 and not out["selected"][t] and out["h"][t] == 0
            continue
        assert out["h"][t] == pytest.approx(h[t], abs=1e-6)
        assert out["d"][t] == pytest.approx(d[t], abs=1e-6)
        assert out["soft_or"][t] == pytest.approx(h[t] + d[t] - h[t] * d[t], abs=1e-6)
        assert int(out["quadrant"][t]) == ref_quadrant(float(out["h"][t]), float(out["d"][t]),
                                                       *tau[t])
    assert out["tau_h"].numel() == -(-(len(off) - 1) // group_size)


@pytest.mark.parametrize("strategy,scope", list(itertools.product(TOPK, ("sequence", "group"))))
def test_topk_strategies_against_reference(strategy, scope):
    off, mask, H, D, F = make_batch(seed=7)
    st = Selection(strategy=strategy, keep=0.3, scope=scope, group_size=4)
    out = token_importance(off, mask, H, D, F, st)
    h = dict(enumerate(out["h"].tolist()))
    d = dict(enumerate(out["d"].tolist()))
    for toks in ref_scopes(off, mask, 4, scope):
        k = ref_k(len(toks), 0.3)
        chosen = [t for t in toks if out["selected"][t]]
        assert len(chosen) == k
        keys = sorted((ref_key(strategy, t, h, d, F) for t in toks), reverse=True)
        got = sorted((ref_key(strategy, t, h, d, F) for t in chosen), reverse=True)
        assert got == pytest.approx(keys[:k], abs=1e-6)  # the K best keys (ties agnostic)
    assert not (out["selected"] & ~mask).any()


@pytest.mark.parametrize("wanted,keep", [("Q3", 1.0), ("Q1+Q3", 0.2), ("Q2+Q4", 0.5)])
def test_quadrant_sets_against_reference(wanted, keep):
    off, mask, H, D, F = make_batch(seed=3, n_seq=20)
    out = token_importance(off, mask, H, D, F, Selection(strategy=f"quadrant:{wanted}", keep=keep))
    codes = {int(q[1]) for q in wanted.split("+")}
    s = out["soft_or"].tolist()
    for toks in ref_scopes(off, mask, 64, "sequence"):
        inside = [t for t in toks if int(out["quadrant"][t]) in codes]
        k = min(len(inside), ref_k(len(toks), keep))
        chosen = [t for t in toks if out["selected"][t]]
        assert set(chosen) <= set(inside) and len(chosen) == k
        assert sorted(s[t] for t in chosen) == sorted(sorted(s[t] for t in inside)[::-1][:k])


def test_quadrant_q3_keeps_low_h_high_d_only():
    off, mask, H, D, F = make_batch(seed=5, n_seq=30)
    out = token_importance(off, mask, H, D, F, Selection(strategy="quadrant:Q3", keep=1.0,
                                                  group_size=8))
    group_T = torch.repeat_interleave(torch.arange(30), off.diff()) // 8
    sel = out["selected"]
    assert sel.any()
    assert (out["h"][sel] < out["tau_h"][group_T[sel]]).all()
    assert (out["d"][sel] >= out["tau_d"][group_T[sel]]).all()
    assert sel.sum() == (mask & (out["quadrant"] == 3)).sum()


def test_absolute_thresholds_and_quadrant_counts_sum():
    off, mask, H, D, F = make_batch(seed=9, n_seq=25)
    out = token_importance(off, mask, H, D, F, Selection(tau_h=0.2, tau_d=0.7))
    q = out["quadrant"][mask]
    counts = [int((q == c).sum()) for c in range(1, 5)]
    assert sum(counts) == int(mask.sum())
    h, d = out["h"][mask], out["d"][mask]
    assert counts[0] == int(((h >= 0.2) & (d >= 0.7)).sum())
    assert counts[2] == int(((h < 0.2) & (d >= 0.7)).sum())
    assert torch.equal(out["tau_h"], torch.full_like(out["tau_h"], 0.2))


def test_all_and_exact_k_both_scopes():
    off, mask, H, D, F = make_batch(seed=11, n_seq=40, max_len=30)
    every = token_importance(off, mask, H, D, F, Selection(strategy="all"))["selected"]
    assert torch.equal(every, mask)
    for strategy in ("random", "entropy-sample", "soft-or", "q3"):
        for scope in ("sequence", "group"):
            out = token_importance(off, mask, H, D, F, Selection(strategy=strategy, keep=0.37,
                                                          scope=scope, group_size=6))
            for toks in ref_scopes(off, mask, 6, scope):
                assert sum(bool(out["selected"][t]) for t in toks) == ref_k(len(toks), 0.37)


def test_seed_determinism_and_variation():
    off, mask, H, D, F = make_batch(seed=12, n_seq=40, max_len=30)
    for strategy in ("random", "entropy-sample"):
        a = token_importance(off, mask, H, D, F, Selection(strategy=strategy), 4)["selected"]
        b = token_importance(off, mask, H, D, F, Selection(strategy=strategy), 4)["selected"]
        c = token_importance(off, mask, H, D, F, Selection(strategy=strategy), 5)["selected"]
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_ties_are_seeded_and_exact():
    off = torch.tensor([0, 10, 20])
    mask = torch.ones(20, dtype=torch.bool)
    const = torch.ones(20)
    sel = [token_importance(off, mask, const, const, const, Selection(keep=0.3), s)["selected"]
           for s in (0, 0, 1, 2, 3)]
    assert all(int(m[:10].sum()) == 3 and int(m[10:].sum()) == 3 for m in sel)
    assert torch.equal(sel[0], sel[1])
    assert len({tuple(m.tolist()) for m in sel}) > 2


def sampling_inclusion(weights, k):
    """Exact inclusion probabilities of sampling k without replacement, p ~ weight."""
    incl = [0.0] * len(weights)
    for order in itertools.permutations(range(len(weights)), k):
        p, left = 1.0, sum(weights)
        for i in order:
            p *= weights[i] / left
            left -= weights[i]
        for i in order:
            incl[i] += p
    return incl


def test_entropy_sample_matches_sampling_without_replacement():
    h_row = torch.tensor([0.1, 0.2, 0.3, 0.9, 0.0])
    reps = 6000
    h = h_row.repeat(reps)
    scope = Rows.build(torch.arange(reps).repeat_interleave(5), reps)
    for alpha in (1.0, 2.0):
        sel = select_mask("entropy-sample", 0.4, h, h, h, h, h, scope, alpha=alpha, seed=0)
        freq = sel.view(reps, 5).float().mean(0)
        expected = sampling_inclusion((h_row ** alpha).tolist(), 2)
        assert torch.allclose(freq, torch.tensor(expected), atol=0.025), (alpha, freq, expected)
        assert freq[4] == 0  # weight 0 is never drawn while others remain


def test_random_is_uniform():
    reps = 4000
    h = torch.rand(reps * 4)
    scope = Rows.build(torch.arange(reps).repeat_interleave(4), reps)
    sel = select_mask("random", 0.5, h, h, h, h, h, scope, seed=3)
    freq = sel.view(reps, 4).float().mean(0)
    assert torch.allclose(freq, torch.full((4,), 0.5), atol=0.03)


def test_budget_and_strategy_names():
    assert budget(torch.tensor([100, 1, 0, 3]), 0.29).tolist() == [29, 1, 0, 1]
    assert catalog.strategy("quadrant:Q1+Q3").quadrants == {1, 3}
    assert strategy_problem("soft-or") is None
    assert strategy_problem("quadrant:Q2") is None
    msg = strategy_problem("bogus")
    assert "soft-or" in msg and "entropy-sample" in msg and "quadrant:" in msg
    assert "bad quadrant" in strategy_problem("quadrant:Q5")
