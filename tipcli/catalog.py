"""The selection strategies and the losses, as data: one table each.

What a strategy ranks tokens by and which statistics it reads; what a loss compares, on
which of the teacher's targets, and whether it needs the teacher loaded. The settings
(``tipcli.configs``), selection (``tipcli.ops.selection``), the losses (``tipcli.ops.losses``),
training and the loop read these tables instead of parsing names. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DIVERGENCES = ("rkl", "fkl", "jsd")
QUADRANTS = ("Q1", "Q2", "Q3", "Q4")    # codes 1..4 in shards
QUADRANT_LABELS = {"Q1": "high h, high d", "Q2": "high h, low d", "Q3": "low h, high d",
                   "Q4": "low h, low d"}
QUADRANT_PREFIX = "quadrant:"


@dataclass(frozen=True)
class Strategy:
    """A selection strategy: which tokens of a scope it keeps."""

    name: str
    ranks: str = ""                  # the key whose top-K it keeps; "" keeps every token
    reads: frozenset[str] = frozenset()  # statistics behind that key: h, d (--divergence), fkl
    quadrants: frozenset[int] = field(default=frozenset())  # a quadrant set: only these

    @property
    def budgeted(self) -> bool:
        """Whether it keeps a budget of ``--keep`` (every strategy but ``all``)."""
        return bool(self.ranks)


_TABLE = (
    Strategy("all"),
    Strategy("random", "gumbel"),
    Strategy("entropy", "h", frozenset({"h"})),
    Strategy("entropy-sample", "h^alpha+gumbel", frozenset({"h"})),  # sampling, p ~ h^alpha
    Strategy("divergence", "d", frozenset({"d"})),
    Strategy("soft-or", "soft_or", frozenset({"h", "d"})),           # the paper's rule
    Strategy("soft-or-bottom", "-soft_or", frozenset({"h", "d"})),   # the paper's control
    Strategy("q3", "fkl*(1-h)", frozenset({"h", "fkl"})),            # the paper's Q3 selector
)
STRATEGIES = {s.name: s for s in _TABLE}
BUDGETED_STRATEGIES = tuple(s.name for s in _TABLE if s.budgeted)


def strategy(name: str) -> Strategy:
    """The strategy called ``name``: a row of the table, or a quadrant set such as
    ``quadrant:Q1+Q3`` (every token inside those quadrants, at most ``--keep`` of them,
    highest Soft-OR first). ValueError with the valid names otherwise."""
    if name in STRATEGIES:
        return STRATEGIES[name]
    if not name.startswith(QUADRANT_PREFIX):
        raise ValueError(f"unknown strategy '{name}'; valid: {', '.join(STRATEGIES)}, "
                         "quadrant:Q1+Q3 (any + of Q1..Q4)")
    names = [p.strip().upper() for p in name[len(QUADRANT_PREFIX):].split("+")]
    if not names or any(n not in QUADRANTS for n in names):
        raise ValueError(f"bad quadrant set in '{name}'; write e.g. quadrant:Q1+Q3")
    return Strategy(name, "soft_or", frozenset({"h", "d"}),
                    frozenset(QUADRANTS.index(n) + 1 for n in names))


def strategy_problem(name: str) -> str | None:
    """None when ``name`` is a valid strategy, else what is wrong with it."""
    try:
        strategy(name)
    except ValueError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class Loss:
    """A distillation loss on the kept tokens (docs/training.md)."""

    name: str
    divergence: str            # rkl, fkl or jsd, between student and teacher
    form: str                  # topk: over the stored top-k + a tail bucket; sampled: the
    #                            sampled token only; full: every token, the teacher loaded
    targets: tuple[str, ...]   # the score tensors it trains on

    @property
    def needs_teacher(self) -> bool:
        """Whether training loads the teacher (``--teacher``) to compute it."""
        return self.form == "full"


TOPK_TARGETS = ("teacher_topk_ids", "teacher_topk_logprobs")
SAMPLED_TARGETS = ("response_ids", "teacher_logprob", "rollout_logprob")
_LOSS_TABLE = (
    *(Loss(f"{d}-topk", d, "topk", TOPK_TARGETS) for d in DIVERGENCES),
    Loss("rkl-sampled", "rkl", "sampled", SAMPLED_TARGETS),
    *(Loss(f"{d}-full", d, "full", ()) for d in DIVERGENCES),
)
LOSSES = {loss.name: loss for loss in _LOSS_TABLE}
