"""Distillation losses: the chunked, gathered path against plain full-logits references
(float64, values and gradients), and the properties each loss must have."""

import pytest
import torch
from reference import reference_token_loss

from tipcli.catalog import LOSSES
from tipcli.ops.losses import chunked_token_loss, divergence, teacher_buckets, token_loss

TOPK_LOSSES = tuple(n for n, loss in LOSSES.items() if loss.form == "topk")
FULL_LOSSES = tuple(n for n, loss in LOSSES.items() if loss.form == "full")

K, H, V, PAD, k = 23, 12, 40, 5, 6   # kept rows, hidden, vocab, padded rows, top-k


def _problem(seed: int = 0):
    """Hidden states, a student head with padded rows, teacher logits and every target."""
    g = torch.Generator().manual_seed(seed)
    hidden_KH = torch.randn(K, H, generator=g, dtype=torch.float64)
    weight = (torch.randn(V + PAD, H, generator=g, dtype=torch.float64) * 0.8)
    t_hidden_KH = torch.randn(K, H, generator=g, dtype=torch.float64)
    t_weight = torch.randn(V + PAD, H, generator=g, dtype=torch.float64)
    t_logits_KV = (t_hidden_KH @ t_weight.T)[:, :V]
    t_lp = torch.log_softmax(t_logits_KV, -1)
    top = t_lp.topk(k, dim=-1)
    tokens = torch.randint(0, V, (K,), generator=g)
    with torch.no_grad():
        s_lp = torch.log_softmax((hidden_KH @ weight.T)[:, :V], -1)
    targets = {"teacher_topk_ids": top.indices.to(torch.int32),
               "teacher_topk_logprobs": top.values,
               "response_ids": tokens.to(torch.int32),
               "teacher_logprob": t_lp.gather(-1, tokens[:, None])[:, 0],
               # an off-policy rollout: its log-probs differ from the current student's
               "rollout_logprob": s_lp.gather(-1, tokens[:, None])[:, 0]
               + 0.3 * torch.randn(K, generator=g, dtype=torch.float64)}
    return hidden_KH, weight, t_hidden_KH, t_weight, targets


@pytest.mark.parametrize("loss", tuple(LOSSES))
@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_chunked_equals_full_logits_reference(loss, chunk_size):
    hidden, weight, t_hidden, t_weight, targets = _problem()
    h1 = hidden.clone().requires_grad_()
    w1 = weight.clone().requires_grad_()
    got_K = chunked_token_loss(loss, h1, lambda x: (x @ w1.T)[:, :V], targets, chunk_size,
                               t_hidden, lambda x: (x @ t_weight.T)[:, :V])
    got_K.sum().backward()

    h2 = hidden.clone().requires_grad_()
    w2 = weight.clone().requires_grad_()
    want_K = reference_token_loss(loss, (h2 @ w2.T)[:, :V], targets, (t_hidden @ t_weight.T)[:, :V])
    want_K.sum().backward()

    assert got_K.shape == (K,)
    torch.testing.assert_close(got_K, want_K, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-9, atol=1e-12)
    assert w1.grad[V:].abs().max() == 0  # padded vocabulary rows never get a gradient
    if loss != "rkl-sampled":
        assert (got_K >= -1e-12).all()


@pytest.mark.parametrize("kind", ["rkl", "fkl", "jsd"])
def test_topk_with_every_id_equals_full_loss(kind):
    """With k = V the top-k coarsening is exact (the tail holds no mass): no nan gradients."""
    hidden, weight, t_hidden, t_weight, _ = _problem(1)
    t_logits = (t_hidden @ t_weight.T)[:, :V]
    lp = torch.log_softmax(t_logits, -1)
    top = lp.topk(V, dim=-1)
    w = weight.clone().requires_grad_()
    s_logits = (hidden @ w.T)[:, :V]
    got = token_loss(f"{kind}-topk", s_logits, {"teacher_topk_ids": top.indices,
                                                  "teacher_topk_logprobs": top.values})
    got.sum().backward()
    assert torch.isfinite(w.grad).all()
    torch.testing.assert_close(got, token_loss(f"{kind}-full", s_logits.detach(), {}, t_logits),
                               rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("loss", TOPK_LOSSES)
def test_topk_with_absent_candidates_equals_the_reference_without_them(loss):
    """An id of -1 (a teacher candidate with no student token) is no bucket: its mass is in
    both tails. Values and gradients equal the reference over each row's present ids alone,
    a row with none gives 0 (both tails hold everything), and nothing is NaN."""
    hidden, weight, t_hidden, t_weight, targets = _problem(4)
    g = torch.Generator().manual_seed(9)
    absent = torch.rand(K, k, generator=g) < 0.4
    absent[0] = True  # a row with no candidate at all
    ids = targets["teacher_topk_ids"].masked_fill(absent, -1)
    lps = targets["teacher_topk_logprobs"].masked_fill(absent, 0.0)  # as a score stores them
    w1 = weight.clone().requires_grad_()
    got = chunked_token_loss(loss, hidden, lambda x: (x @ w1.T)[:, :V],
                             {"teacher_topk_ids": ids, "teacher_topk_logprobs": lps}, 5)
    got.sum().backward()
    w2 = weight.clone().requires_grad_()
    s_logits = (hidden @ w2.T)[:, :V]
    want = torch.stack([reference_token_loss(loss, s_logits[i:i + 1], {
        "teacher_topk_ids": ids[i:i + 1, ~absent[i]],
        "teacher_topk_logprobs": lps[i:i + 1, ~absent[i]]})[0] for i in range(K)])
    want.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-9, atol=1e-12)
    assert float(got[0].detach()) == 0.0 and bool(torch.isfinite(w1.grad).all())
    assert bool((got[1:] > 0).all())


def test_topk_is_a_lower_bound_of_the_full_divergence():
    """Merging tokens into one bucket can only lower a KL (data processing inequality)."""
    hidden, weight, t_hidden, t_weight, targets = _problem(2)
    s_logits, t_logits = (hidden @ weight.T)[:, :V], (t_hidden @ t_weight.T)[:, :V]
    for kind in ("rkl", "fkl", "jsd"):
        coarse = token_loss(f"{kind}-topk", s_logits, targets)
        full = token_loss(f"{kind}-full", s_logits, {}, t_logits)
        assert (coarse <= full + 1e-12).all() and (coarse < full).any()


def test_teacher_tail_rounded_away_stays_finite():
    """Stored top-k log-probs whose mass rounds to 1 would give log(0) without the floor."""
    lp = torch.tensor([[0.0, -40.0, -41.0]], dtype=torch.float32)
    log_r = teacher_buckets(lp)
    assert torch.isfinite(log_r).all()
    s_logits = torch.zeros(1, 10, requires_grad=True)
    loss = token_loss("rkl-topk", s_logits, {"teacher_topk_ids": torch.tensor([[0, 1, 2]]),
                                             "teacher_topk_logprobs": lp})
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(s_logits.grad).all()


def test_sampled_gradient_is_the_reverse_kl_gradient_in_expectation():
    """On policy, E_{y ~ p_s}[grad of the sampled loss] equals grad KL(p_s || p_t): enumerate
    every y of one position and weight its gradient by p_s(y)."""
    g = torch.Generator().manual_seed(3)
    s_logits = torch.randn(1, V, generator=g, dtype=torch.float64)
    t_lp = torch.log_softmax(torch.randn(1, V, generator=g, dtype=torch.float64), -1)
    x = s_logits.expand(V, V).clone().requires_grad_()
    s_lp = torch.log_softmax(s_logits, -1)[0]
    ys = torch.arange(V)
    loss_V = token_loss("rkl-sampled", x, {"response_ids": ys, "teacher_logprob": t_lp[0],
                                            "rollout_logprob": s_lp})
    (loss_V * s_lp.exp()).sum().backward()
    expected_grad = x.grad.sum(0)
    y = s_logits.clone().requires_grad_()
    divergence("rkl", torch.log_softmax(y, -1), t_lp).sum().backward()
    torch.testing.assert_close(expected_grad, y.grad[0], rtol=1e-9, atol=1e-12)
    # its value is the sample estimate whose expectation is the KL itself
    torch.testing.assert_close((loss_V * s_lp.exp()).sum(),
                               divergence("rkl", s_lp[None], t_lp)[0], rtol=1e-10, atol=0)


def test_sampled_importance_weight_follows_the_rollout_logprob():
    s_logits = torch.randn(4, V, dtype=torch.float64)
    lp = torch.log_softmax(s_logits, -1)[:, 0]
    t = {"response_ids": torch.zeros(4, dtype=torch.long), "teacher_logprob": lp - 1.0}
    on = token_loss("rkl-sampled", s_logits, {**t, "rollout_logprob": lp})
    off = token_loss("rkl-sampled", s_logits, {**t, "rollout_logprob": lp - 0.5})
    torch.testing.assert_close(on, torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(off, torch.full((4,), 0.5, dtype=torch.float64).exp())


@pytest.mark.parametrize("loss", TOPK_LOSSES + FULL_LOSSES)
def test_zero_when_student_equals_teacher(loss):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(7, V, generator=g, dtype=torch.float64)
    top = torch.log_softmax(logits, -1).topk(k, dim=-1)
    got = token_loss(loss, logits, {"teacher_topk_ids": top.indices,
                                    "teacher_topk_logprobs": top.values}, logits)
    torch.testing.assert_close(got, torch.zeros(7, dtype=torch.float64), rtol=0, atol=1e-12)


def _saved_bytes(fn) -> int:
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved)


def test_chunked_graph_holds_no_logits():
    """Autograd keeps each chunk's inputs, not its logits: the saved tensors of the chunked
    path are a small fraction of one K x V logits matrix, while the plain path saves several."""
    big_K, big_V, g = 1000, 5000, torch.Generator().manual_seed(5)
    h = torch.randn(big_K, 16, generator=g).requires_grad_()
    w = torch.randn(big_V, 16, generator=g).requires_grad_()
    t_lp = torch.log_softmax(torch.randn(big_K, big_V, generator=g), -1).topk(4, dim=-1)
    tg = {"teacher_topk_ids": t_lp.indices.to(torch.int32), "teacher_topk_logprobs": t_lp.values}
    logits_bytes = big_K * big_V * 4
    chunked = _saved_bytes(lambda: chunked_token_loss("rkl-topk", h, lambda x: x @ w.T, tg, 100))
    plain = _saved_bytes(lambda: token_loss("rkl-topk", h @ w.T, tg))
    assert chunked < 0.02 * logits_bytes
    assert plain > logits_bytes
