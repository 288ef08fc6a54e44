"""One response text, two tokenizations: spans whose boundaries coincide.

A teacher with another tokenizer reads the student's response as text, tokenized its own
way. Each token of either side ends at a character offset into that text; the offsets
both sides end at cut the text into spans, each a run of student tokens and a run of
teacher tokens covering the same characters (most spans are one token on each side). A
token that ends inside a character (a byte-level piece of a multi-byte character) ends
no span.

From the teacher's log-probs of its own tokens, a span's teacher log-prob (their sum) is
exact; the student's, of its tokens, too. Their difference is a sampled-token estimate of
the reverse KL over the span, spread evenly over the span's student tokens
(``spread_to_student``), so that the per-token values add up to the span's.

Shape letters: S student tokens, T teacher tokens, N spans.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tipcli.errors import TipError


@dataclass(frozen=True)
class Spans:
    """Span n covers student tokens ``student_starts[n]:student_starts[n + 1]`` and
    teacher tokens ``teacher_starts[n]:teacher_starts[n + 1]`` (N + 1 offsets each)."""

    student_starts: torch.Tensor
    teacher_starts: torch.Tensor

    @property
    def count(self) -> int:
        return self.student_starts.numel() - 1

    def student_span_B(self) -> torch.Tensor:
        """The span of each student token [S]."""
        return torch.repeat_interleave(torch.arange(self.count), self.student_starts.diff())

    def one_to_one_N(self) -> torch.Tensor:
        """Whether each span is one token on each side [N]."""
        return (self.student_starts.diff() == 1) & (self.teacher_starts.diff() == 1)


def student_ends(tokenizer, ids: list[int], text: str) -> list[int]:
    """The character offset into ``text`` (the decoded ``ids``) at which each student token
    ends, or -1 where its prefix does not decode to a prefix of ``text`` or ends in a
    replacement character (it ends inside a character: the last tokens of a response cut
    mid-character never end one)."""
    ends = []
    for i in range(1, len(ids) + 1):
        prefix = tokenizer.decode(ids[:i], clean_up_tokenization_spaces=False)
        ends.append(len(prefix) if text.startswith(prefix) and "\ufffd" not in prefix[-1:]
                    else -1)
    return ends


def teacher_tokens(tokenizer, text: str, what: str) -> tuple[list[int], list[int]]:
    """The teacher's own tokens of ``text`` and the character offset each ends at (-1:
    inside a character). Refused in one line when they do not give ``text`` back."""
    if not getattr(tokenizer, "is_fast", False):
        raise TipError("--cross-tokenizer needs a fast (Rust) tokenizer for the teacher, for "
                       "its character offsets; its tokenizer is a slow one: convert it "
                       "(tokenizer.json) or score with a teacher that has one")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    back = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    if back != text:
        at = next((i for i, (a, b) in enumerate(zip(back, text)) if a != b),
                  min(len(back), len(text)))
        raise TipError(f"the teacher's tokenizer cannot reproduce {what}: its tokens decode to "
                       f"{back[max(0, at - 10):at + 10]!r} where the text is "
                       f"{text[max(0, at - 10):at + 10]!r} (normalisation or unknown "
                       "characters): use a teacher whose tokenizer round-trips this text")
    ends = []
    for j, (_, end) in enumerate(offsets):
        nxt = offsets[j + 1][0] if j + 1 < len(offsets) else len(text)
        ends.append(end if end <= nxt else -1)
    if ids:
        ends[-1] = len(text)
    return ids, ends


def align(s_ends: list[int], t_ends: list[int], max_span: int = 0) -> Spans:
    """Spans of two tokenizations of one text from each token's end offset (-1: ends no
    span); both must end at the text's end. ``max_span`` (0: no bound) bounds the tokens
    of a span on either side."""
    s_starts, t_starts = [0], [0]
    j = 0
    for i, end in enumerate(s_ends):
        if end < 0:
            continue
        while j < len(t_ends) and (t_ends[j] < 0 or t_ends[j] < end):
            j += 1
        if j < len(t_ends) and t_ends[j] == end:
            s_starts.append(i + 1)
            t_starts.append(j + 1)
            j += 1
    if s_starts[-1] != len(s_ends) or t_starts[-1] != len(t_ends):
        raise TipError("the student's and the teacher's tokens do not end at the same "
                       "character: the two tokenizations are not of one text")
    spans = Spans(torch.tensor(s_starts), torch.tensor(t_starts))
    if max_span:
        longest = int(torch.maximum(spans.student_starts.diff(),
                                    spans.teacher_starts.diff()).max()) if spans.count else 0
        if longest > max_span:
            raise TipError(f"a span of the aligned tokenizations is {longest} tokens long, more "
                           f"than --max-span {max_span}: the two tokenizers cut this text too "
                           "differently; raise --max-span or pick a teacher whose tokenizer is "
                           "closer to the student's")
    return spans


def span_sums(values_X: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """The sum of ``values`` over each span [N] (``starts``: one side's offsets)."""
    index = torch.repeat_interleave(torch.arange(starts.numel() - 1), starts.diff())
    return torch.zeros(starts.numel() - 1, dtype=values_X.dtype).index_add_(0, index, values_X)


def span_log_ratio(s_logprob_S: torch.Tensor, t_logprob_T: torch.Tensor,
                   spans: Spans) -> torch.Tensor:
    """``log r`` of each span [N], float64: its teacher log-prob (the sum over its teacher
    tokens) minus its student log-prob."""
    return span_sums(t_logprob_T.double(), spans.teacher_starts) - \
        span_sums(s_logprob_S.double(), spans.student_starts)


def spread(values_N: torch.Tensor, spans: Spans) -> torch.Tensor:
    """Each span's value shared evenly by its student tokens [S]: the per-token values add
    up to the span's."""
    return (values_N / spans.student_starts.diff().to(values_N.dtype))[spans.student_span_B()]


def spread_to_student(s_logprob_S: torch.Tensor, t_logprob_T: torch.Tensor,
                      spans: Spans) -> tuple[torch.Tensor, torch.Tensor]:
    """Per student token: the teacher log-prob given to it (its own log-prob plus its
    share of the span's ``log r``; on a one-to-one span the teacher's log-prob of the
    token) and the sampled-token rKL estimate (minus that share)."""
    share_S = spread(span_log_ratio(s_logprob_S, t_logprob_T, spans), spans)
    return (s_logprob_S.double() + share_S).to(s_logprob_S.dtype), \
        (-share_S).to(s_logprob_S.dtype)
