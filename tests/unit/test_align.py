"""Spans of two tokenizations of one text (tipcli.ops.align) against plain references."""

from __future__ import annotations

import random

import pytest
import torch

from tipcli.errors import TipError
from tipcli.models.tiny import build_bpe_tokenizer, build_tokenizer
from tipcli.ops.align import align, span_sums, spread_to_student, student_ends, teacher_tokens

CORPUS = ["the cat sat on the mat", "12 + 34 = 46", "héllo wörld, 日本語 ok",
          "a quick brown fox jumps over the lazy dog"] * 20


def byte_bpe(vocab_size: int):
    return build_bpe_tokenizer(CORPUS, vocab_size)


def spans_of(s_tok, t_tok, text, max_span=0):
    s_ids = s_tok(text, add_special_tokens=False)["input_ids"]
    t_ids, t_ends = teacher_tokens(t_tok, text, "the response")
    return s_ids, t_ids, align(student_ends(s_tok, s_ids, text), t_ends, max_span)


def test_worked_example_of_docs_design():
    """The example of docs/design.md: a character student, a teacher with whole words."""
    s_tok, t_tok = build_tokenizer(), byte_bpe(330)
    s_ids, t_ids, spans = spans_of(s_tok, t_tok, "the cat")
    assert [t_tok.decode([i]) for i in t_ids] == ["the", " cat"]
    assert spans.student_starts.tolist() == [0, 3, 7]
    assert spans.teacher_starts.tolist() == [0, 1, 2]
    assert spans.one_to_one_N().tolist() == [False, False]


@pytest.mark.parametrize("sizes", [(300, 270), (400, 300), (270, 400)])
def test_every_span_is_the_same_text_on_both_sides(sizes):
    """Random strings (multi-byte characters among them) under two byte-level BPEs: the
    spans tile both token sequences and each span's two sides decode to the same text."""
    s_tok, t_tok = byte_bpe(sizes[0]), byte_bpe(sizes[1])
    rng = random.Random(0)
    alphabet = "the cat sat mat 0123456789+= héöw日本語,"
    for _ in range(50):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        s_ids, t_ids, spans = spans_of(s_tok, t_tok, text)
        ss, ts = spans.student_starts.tolist(), spans.teacher_starts.tolist()
        assert ss[-1] == len(s_ids) and ts[-1] == len(t_ids)
        assert all(b > a for a, b in zip(ss, ss[1:])) and all(b > a for a, b in zip(ts, ts[1:]))
        pieces = [s_tok.decode(s_ids[a:b]) for a, b in zip(ss, ss[1:])]
        assert pieces == [t_tok.decode(t_ids[a:b]) for a, b in zip(ts, ts[1:])]
        assert "".join(pieces) == text


def test_a_token_ending_inside_a_character_ends_no_span():
    """Byte-level pieces of one character: the span boundary waits for the character's end."""
    s_tok = byte_bpe(262)  # bytes and a few merges: 日 is three tokens
    t_tok = build_tokenizer(chars="日本 ab")
    text = "a日b"
    s_ids = s_tok(text, add_special_tokens=False)["input_ids"]
    ends = student_ends(s_tok, s_ids, text)
    assert len(s_ids) > 3 and ends.count(-1) >= 2 and ends[-1] == len(text)
    _, t_ends = teacher_tokens(t_tok, text, "the response")
    spans = align(ends, t_ends)
    assert spans.teacher_starts.tolist() == [0, 1, 2, 3]
    assert spans.student_starts.diff().tolist()[1] == len(s_ids) - 2


def test_same_tokenizer_gives_one_to_one_spans_and_the_teachers_log_probs():
    tok = build_tokenizer()
    _, _, spans = spans_of(tok, tok, "12 + 34 = 46")
    assert bool(spans.one_to_one_N().all())
    s_lp, t_lp = -torch.rand(12), -torch.rand(12)
    given, rkl = spread_to_student(s_lp, t_lp, spans)
    torch.testing.assert_close(given, t_lp, rtol=0, atol=1e-7)
    torch.testing.assert_close(rkl, s_lp - t_lp, rtol=0, atol=1e-7)


def test_spread_keeps_each_spans_estimate():
    """Summed over a span's student tokens, the rKL estimate is the span's student log-prob
    minus its teacher log-prob (plain loops as the reference)."""
    s_tok, t_tok = build_tokenizer(), byte_bpe(320)
    s_ids, t_ids, spans = spans_of(s_tok, t_tok, "the cat sat on the mat")
    torch.manual_seed(0)
    s_lp, t_lp = -torch.rand(len(s_ids)), -torch.rand(len(t_ids))
    given, rkl = spread_to_student(s_lp, t_lp, spans)
    ss, ts = spans.student_starts.tolist(), spans.teacher_starts.tolist()
    for n in range(spans.count):
        want = float(s_lp[ss[n]:ss[n + 1]].sum() - t_lp[ts[n]:ts[n + 1]].sum())
        assert abs(float(rkl[ss[n]:ss[n + 1]].sum()) - want) < 1e-5
        assert abs(float(given[ss[n]:ss[n + 1]].sum()) - float(t_lp[ts[n]:ts[n + 1]].sum())) \
            < 1e-5
    torch.testing.assert_close(span_sums(s_lp, spans.student_starts),
                               torch.stack([s_lp[a:b].sum() for a, b in zip(ss, ss[1:])]))


def test_a_teacher_that_cannot_reproduce_the_text_is_one_line():
    t_tok = build_tokenizer(chars="abc ")
    with pytest.raises(TipError, match="cannot reproduce the response.*unknown characters"):
        teacher_tokens(t_tok, "ab é", "the response")


def test_a_span_longer_than_the_bound_is_refused():
    s_tok, t_tok = build_tokenizer(), byte_bpe(320)
    spans_of(s_tok, t_tok, "the cat", max_span=4)
    with pytest.raises(TipError, match="4 tokens long, more than --max-span 3"):
        spans_of(s_tok, t_tok, "the cat", max_span=3)
