"""The estimates of a teacher with another tokenizer (tipcli.models.cross) against plain
references: the span estimates are unbiased, the mapped top-k ones are the *-topk
coarsening, and the vocabulary map pairs the tokens that are the same string."""

from __future__ import annotations

import math

import torch

from tipcli.models.cross import mapped_divergences, span_divergences, vocabulary_map
from tipcli.models.tiny import build_bpe_tokenizer, build_tokenizer


def kl(p, q):
    return float(sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0))


def test_span_estimates_against_the_exact_divergences():
    """Over a toy distribution of whole spans, the student-weighted mean of the rKL estimate
    is the exact rKL, and of the unclipped JSD estimate the exact JSD; the fKL estimate is
    (log r)^2 / 2, within a third of the exact fKL where the two are close."""
    torch.manual_seed(0)
    for _ in range(5):
        p_s = torch.rand(6).double().softmax(0)
        p_t = (torch.rand(6) / 2).double().softmax(0)  # close: no estimate clipped
        est = span_divergences(p_t.log() - p_s.log())
        m = (p_s + p_t) / 2
        assert abs(float((p_s * est["rkl"]).sum()) - kl(p_s, p_t)) < 1e-12
        assert abs(float((p_s * est["jsd"]).sum()) - (0.5 * kl(p_s, m) + 0.5 * kl(p_t, m))) \
            < 1e-12
        fkl = float((p_s * est["fkl"]).sum())
        assert abs(fkl - kl(p_t, p_s)) < kl(p_t, p_s) / 3
    far = span_divergences(torch.tensor([30.0, -30.0], dtype=torch.float64))
    assert float(far["jsd"].max()) == math.log(2.0) and float(far["fkl"][0]) == 450.0


def test_mapped_divergences_over_the_whole_vocabulary_are_exact():
    torch.manual_seed(1)
    ls, lt = torch.randn(4, 9).log_softmax(-1), (2 * torch.randn(4, 9)).log_softmax(-1)
    got = mapped_divergences(ls, lt, torch.ones(4, 9, dtype=torch.bool))
    for c in range(4):
        p, q = ls[c].double().exp().tolist(), lt[c].double().exp().tolist()
        m = [(a + b) / 2 for a, b in zip(p, q)]
        assert abs(float(got["rkl"][c]) - kl(p, q)) < 1e-6
        assert abs(float(got["fkl"][c]) - kl(q, p)) < 1e-6
        assert abs(float(got["jsd"][c]) - (0.5 * kl(p, m) + 0.5 * kl(q, m))) < 1e-6


def test_mapped_divergences_put_unmapped_candidates_in_the_tail():
    """A plain reference: the valid candidates as buckets, everything else in one tail on
    each side."""
    torch.manual_seed(2)
    ls, lt = torch.randn(3, 12).log_softmax(-1), torch.randn(3, 12).log_softmax(-1)
    k = 5
    top = lt.topk(k, -1).indices
    valid = torch.tensor([[1, 1, 0, 1, 0], [1, 1, 1, 1, 1], [0, 1, 0, 0, 1]], dtype=torch.bool)
    got = mapped_divergences(ls.gather(-1, top), lt.gather(-1, top), valid)
    for c in range(3):
        ids = [int(top[c, j]) for j in range(k) if valid[c, j]]
        p = [math.exp(float(ls[c, i])) for i in ids]
        q = [math.exp(float(lt[c, i])) for i in ids]
        p.append(1 - sum(p))
        q.append(1 - sum(q))
        assert abs(float(got["rkl"][c]) - kl(p, q)) < 1e-6


def test_vocabulary_map_pairs_tokens_that_are_the_same_string():
    s_tok = build_tokenizer()
    t_tok = build_bpe_tokenizer(["the cat sat on the mat"] * 10, size=280)
    vmap = vocabulary_map(t_tok, s_tok)
    vocab = s_tok.get_vocab()
    for t_id in range(len(t_tok)):
        text = t_tok.decode([t_id])
        if t_id == t_tok.eos_token_id:
            assert int(vmap[t_id]) == s_tok.eos_token_id
        elif len(text) == 1 and text in vocab:
            assert int(vmap[t_id]) == vocab[text], repr(text)
        elif len(text) > 1 and not text.startswith("<"):
            assert int(vmap[t_id]) == -1, repr(text)  # "the", " c": several student tokens
    assert int((vmap >= 0).sum()) > 60


def test_a_response_cut_inside_a_character_ends_in_a_span_the_teacher_reads_nothing_of():
    from tipcli.models.cross import align_response

    s_tok = build_bpe_tokenizer(["ab"], size=260)  # bytes only: 日 is three tokens
    t_tok = build_tokenizer(chars="ab日")
    ids = s_tok("ab日", add_special_tokens=False)["input_ids"]
    cut = ids[:-1] + [s_tok.eos_token_id]  # two of 日's three bytes, then EOS
    t_ids, spans = align_response(s_tok, t_tok, cut, "it")
    assert [t_tok.decode([i]) for i in t_ids] == ["a", "b", "</s>"]
    assert spans.student_starts.tolist()[-3:] == [2, len(cut) - 1, len(cut)]
    assert spans.teacher_starts.tolist()[-3:] == [2, 2, 3]
    assert spans.one_to_one_N().tolist() == [True, True, False, True]
