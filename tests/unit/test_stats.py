"""Chunked per-token statistics against the plain float64 reference."""

import math

import pytest
import torch
from reference import reference_stats

from tipcli.ops.forward import head_logits
from tipcli.ops.stats import STAT_NAMES, chunk_stats, token_stats


def _random_logits(P=37, V=50, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(P, V, generator=g) * scale
    t = torch.randn(P, V, generator=g) * scale
    tokens = torch.randint(0, V, (P,), generator=g)
    return s, t, tokens


@pytest.mark.parametrize("scale", [0.1, 3.0, 20.0])
def test_chunk_stats_match_reference(scale):
    s, t, tokens = _random_logits(scale=scale)
    got = chunk_stats(s, t, tokens)
    ref = reference_stats(s, t, tokens)
    for name in STAT_NAMES:
        torch.testing.assert_close(got[name].double(), ref[name], atol=1e-5, rtol=1e-5,
                                   msg=name)


@pytest.mark.parametrize("V", [49_152, 151_936])
@pytest.mark.parametrize("scale", [1.0, 3.0, 10.0])
def test_chunk_stats_exact_at_real_vocab_sizes(V, scale):
    """Sums over a SmolLM2- or Qwen-sized vocabulary in float32 stay within 1e-5 of float64
    (a sequentially accumulated dot product drifts by ~1e-4 here)."""
    s, t, tokens = _random_logits(P=6, V=V, seed=1, scale=scale)
    t = s + 0.5 * t  # related distributions, as student and teacher are
    got = chunk_stats(s, t, tokens, top_k=4)
    ref = reference_stats(s, t, tokens)
    for name in STAT_NAMES:
        torch.testing.assert_close(got[name].double(), ref[name], atol=1e-5, rtol=1e-5,
                                   msg=name)


def test_jsd_bounded_and_kl_nonnegative():
    s, t, tokens = _random_logits(scale=30.0)
    got = chunk_stats(s, t, tokens)
    assert (got["rkl"] >= 0).all() and (got["fkl"] >= 0).all()
    assert (got["jsd"] >= 0).all() and (got["jsd"] <= math.log(2) + 1e-6).all()


def test_identical_distributions_give_zero_divergence():
    s, _, tokens = _random_logits()
    got = chunk_stats(s, s.clone(), tokens)
    for name in ("rkl", "fkl", "jsd"):
        assert got[name].abs().max() < 1e-6
    torch.testing.assert_close(got["student_entropy"], got["teacher_entropy"])


def test_topk_are_teacher_best_logprobs():
    s, t, tokens = _random_logits()
    got = chunk_stats(s, t, tokens, top_k=5)
    lt = torch.log_softmax(t.double(), -1)
    vals, ids = lt.topk(5, dim=-1)
    assert torch.equal(got["teacher_topk_ids"].long(), ids)
    torch.testing.assert_close(got["teacher_topk_logprobs"].double(), vals, atol=1e-6, rtol=0)


class _Head(torch.nn.Module):
    """A stand-in for a causal LM's output layer with padded vocabulary rows."""

    def __init__(self, H, V_padded, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lm_head = torch.nn.Linear(H, V_padded, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.randn(V_padded, H, generator=g))
            self.lm_head.weight[-7:] += 50.0  # padded rows dominate if not dropped
        self.config = type("C", (), {})()

    def get_output_embeddings(self):
        return self.lm_head


@pytest.mark.parametrize("chunk_size", [1, 5, 64, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_stats_chunked_with_padded_vocab(chunk_size, temperature):
    P, H, V, pad = 53, 16, 40, 7
    g = torch.Generator().manual_seed(1)
    hs, ht = torch.randn(P, H, generator=g), torch.randn(P, H, generator=g)
    tokens = torch.randint(0, V, (P,), generator=g)
    ms, mt = _Head(H, V + pad, 2), _Head(H, V + pad, 3)
    got = token_stats(hs, ht, tokens, head_logits(ms, V, temperature),
                      head_logits(mt, V, temperature), top_k=4, chunk_size=chunk_size)
    with torch.no_grad():
        ref = reference_stats(ms.lm_head(hs)[:, :V] / temperature,
                              mt.lm_head(ht)[:, :V] / temperature, tokens)
    for name in STAT_NAMES:
        torch.testing.assert_close(got[name].double(), ref[name], atol=1e-5, rtol=1e-5,
                                   msg=name)
    assert got["teacher_topk_ids"].max() < V


def test_softcapping_applied():
    H, V = 8, 12
    m = _Head(H, V, 0)
    m.config.final_logit_softcapping = 2.0
    h = torch.randn(3, H)
    logits = head_logits(m, V)(h)
    assert logits.abs().max() <= 2.0


def test_masked_logits_give_finite_stats():
    """A -inf logit (a token a model rules out) contributes zero, not nan."""
    s, t, tokens = _random_logits(P=9, V=20)
    s[:, 3] = float("-inf")
    t[:, 5] = float("-inf")
    tokens = tokens.clamp(6, 19)
    got = chunk_stats(s, t, tokens, top_k=3)
    for name in ("student_entropy", "teacher_entropy", "rkl", "jsd"):
        assert torch.isfinite(got[name]).all(), name
    ref = reference_stats(s, t, tokens)
    for name in ("student_entropy", "teacher_entropy", "jsd"):
        torch.testing.assert_close(got[name].double(), ref[name], atol=1e-5, rtol=1e-5)


def bf16_pair(V: int = 300, H: int = 64, P: int = 48):
    """Two bf16 heads on bf16 hidden states whose logits reach |16-32| (a trained LLM's
    range), and the tokens: the statistics of exactly these bf16 numbers are the target."""
    g = torch.Generator().manual_seed(3)
    heads = [torch.nn.Linear(H, V, bias=False).to(torch.bfloat16) for _ in range(2)]
    for head in heads:
        with torch.no_grad():
            head.weight.copy_(torch.randn(V, H, generator=g) * 0.8)
    hidden = [torch.randn(P, H, generator=g).to(torch.bfloat16) for _ in range(2)]
    return heads, hidden, torch.randint(0, V, (P,), generator=g)


class _Model:
    """What head_logits reads of a model: its output embeddings and config."""

    def __init__(self, head):
        self.head, self.config = head, type("Config", (), {})()

    def get_output_embeddings(self):
        return self.head


def test_bf16_model_statistics_are_exact_with_float32_heads():
    """A bf16 model's statistics against float64 arithmetic on the same bf16 weights and
    hidden states: within 1e-4 with float32 heads; rounding the logits to bf16 (the
    model's dtype) would be off by more than 1e-2 at these magnitudes."""
    (hs, ht), (xs, xt), tokens = bf16_pair()
    V = hs.weight.shape[0]
    got = token_stats(xs, xt, tokens, head_logits(_Model(hs), V), head_logits(_Model(ht), V),
                      chunk_size=7)
    logits = [x.double() @ h.weight.detach().double().T for x, h in ((xs, hs), (xt, ht))]
    assert max(float(lg.abs().max()) for lg in logits) > 16
    ref = reference_stats(*logits, tokens)
    rounded = chunk_stats(*(lg.to(torch.bfloat16).float() for lg in logits), tokens)
    for name in STAT_NAMES:
        torch.testing.assert_close(got[name].double(), ref[name], atol=1e-4, rtol=1e-4,
                                   msg=name)
    assert max(float((rounded[n].double() - ref[n]).abs().max()) for n in STAT_NAMES) > 1e-2


def test_auto_chunk_is_sized_for_the_device():
    """0 = auto: about 2^22 logits on the CPU; on a GPU from its free memory (a quarter of
    it for 8 float32 buffers of C x V), between the CPU's size and 8192 positions."""
    from tipcli.ops.stats import auto_chunk

    V = 151_936
    assert auto_chunk(64, V, "cuda", free_bytes=10**12) == 64  # given: kept
    assert auto_chunk(0, V) == auto_chunk(0, V, "cpu") == (1 << 22) // V == 27
    assert auto_chunk(0, V, "cuda:0", free_bytes=80 << 30) == (80 << 28) // (32 * V) == 4416
    assert auto_chunk(0, V, "cuda", free_bytes=1 << 40) == 8192
    assert auto_chunk(0, V, "cuda", free_bytes=1 << 20) == 27


def test_a_bf16_head_is_upcast_once_a_call_and_follows_updates(monkeypatch):
    """Out of training the float32 copy of a bf16 head is made once for all chunks (not
    once a chunk), and made again when the weight changes in place; in training each
    chunk's upcast stays in the graph, so the gradient reaches the bf16 weight."""
    from tipcli.ops import forward

    (head, _), (x, _), _ = bf16_pair()
    V = head.weight.shape[0]
    upcasts = []
    real = forward.wide
    monkeypatch.setattr(forward, "wide", lambda t: upcasts.append(t.shape) or real(t))
    fn = head_logits(_Model(head), V)
    with torch.no_grad():
        before = [fn(x[a:a + 8]) for a in range(0, x.shape[0], 8)]
    assert sum(s == head.weight.shape for s in upcasts) == 1
    with torch.no_grad():
        head.weight.mul_(2)
        after = fn(x[:8])
    torch.testing.assert_close(after, x[:8].float() @ head.weight.float().T)
    assert not torch.equal(after, before[0])
    head.weight.requires_grad_(True)
    upcasts.clear()
    fn(x[:8]).sum().backward()
    fn(x[8:16]).sum().backward()
    assert sum(s == head.weight.shape for s in upcasts) == 2
    assert head.weight.grad is not None and head.weight.grad.dtype == torch.bfloat16
