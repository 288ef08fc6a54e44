"""`tip select`: choose the response tokens to train on (a selection directory).

    tip select runs/score --strategy soft-or --keep 0.5 -o runs/select

Computes normalised entropy h and divergence d for every response token of a score
directory (see ``tipcli.importance`` and DESIGN.md), their Soft-OR score and quadrant,
and the mask a strategy keeps. Mask shard i points at score shard i (same sequences,
same ``response_offsets``) and holds only ``selected``, ``h``, ``d``, ``soft_or`` and
``quadrant``; nothing of the score data is copied. Normalisation groups of
``group_size`` consecutive sequences follow the whole directory's sequence order, so a
group may span shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from tipcli.config import option, to_dict

SELECT_TENSORS = ("response_offsets", "selected", "h", "d", "soft_or", "quadrant")


@dataclass(frozen=True)
class SelectConfig:
    score: str = option("", "Score directory to select from.")
    output: str = option("", "Output directory.")
    strategy: str = option("soft-or", "all, random, entropy, entropy-sample, divergence, soft-or, "
                           "soft-or-bottom, q3, or quadrant:Q1+Q3 (any + of Q1..Q4).")
    keep: float = option(0.5, "Fraction of response tokens kept, in (0, 1] (quadrant sets: "
                         "at most this many; 1 = every token inside; ignored by all).")
    scope: str = option("sequence", "Budget per sequence, or per normalisation group.")
    divergence: str = option("rkl", "Divergence behind d: rkl, fkl or jsd.")
    normalize: str = option("minmax", "minmax (paper: 98th-pct entropy clip), bound or rank.")
    group_size: int = option(64, "Consecutive sequences per normalisation group.")
    alpha: float = option(1.0, "entropy-sample: keep probability proportional to h^alpha.")
    tau_h: Optional[float] = option(None, "Absolute threshold on h (default: group median).")
    tau_d: Optional[float] = option(None, "Absolute threshold on d (default: group median).")
    seed: int = option(0, "Seed for sampling and tie-breaking (same seed = same mask).")

    def validate(self) -> list[str]:
        from tipcli.importance import DIVERGENCES, NORMALIZERS, SCOPES, strategy_problem

        p = []
        if not self.score:
            p.append("a score directory is required")
        if not self.output:
            p.append("-o/--output is required")
        problem = strategy_problem(self.strategy)
        if problem:
            p.append(problem)
        if not 0 < self.keep <= 1:
            p.append("--keep must be in (0, 1]")
        p += _choice("--scope", self.scope, SCOPES)
        p += _choice("--divergence", self.divergence, DIVERGENCES)
        p += _choice("--normalize", self.normalize, NORMALIZERS)
        if self.group_size < 1:
            p.append("--group-size must be at least 1")
        if self.alpha < 0:
            p.append("--alpha must be >= 0")
        for name, tau in (("--tau-h", self.tau_h), ("--tau-d", self.tau_d)):
            if tau is not None and not 0 <= tau <= 1:
                p.append(f"{name} must be in [0, 1] (h and d are normalised)")
        return p

    def settings(self):
        """The ``tipcli.importance.Settings`` these flags stand for."""
        from tipcli.importance import Settings

        return Settings(**{k: getattr(self, k) for k in Settings.__dataclass_fields__})


def _choice(flag: str, value: str, valid: tuple[str, ...]) -> list[str]:
    return [] if value in valid else [f"{flag} must be one of {', '.join(valid)} (got '{value}')"]


SCORE_FIELDS = ("response_offsets", "response_mask", "student_entropy", "rkl", "fkl", "jsd")


def load_flat(score, fields=SCORE_FIELDS) -> tuple[dict[str, Any], list[int]]:
    """The score directory's per-token fields concatenated in sequence order (with
    ``response_offsets`` [N+1] re-based over the whole directory) and each shard's own
    response offsets."""
    import torch

    parts: dict[str, list] = {f: [] for f in fields if f != "response_offsets"}
    shard_offsets = []
    for shard in score.iter_shards():
        shard_offsets.append(shard["response_offsets"])
        for f in parts:
            parts[f].append(shard[f])
    flat = {f: torch.cat(v) for f, v in parts.items()}
    lengths_N = torch.cat([o.diff() for o in shard_offsets])
    flat["response_offsets"] = torch.cat([lengths_N.new_zeros(1), lengths_N.cumsum(0)])
    return flat, shard_offsets


def compute_all(score, cfg: SelectConfig):
    """(per-token results over the whole directory, each shard's response offsets)."""
    from tipcli.importance import importance

    flat, shard_offsets = load_flat(score)
    out = importance(flat["response_offsets"], flat["response_mask"], flat["student_entropy"],
                     flat[cfg.divergence], flat["fkl"], cfg.settings(),
                     score.manifest["tokenizer"]["vocab_size"])
    out["response_mask"] = flat["response_mask"].bool()
    return out, shard_offsets


def compute_selection(score, cfg: SelectConfig) -> list[dict[str, Any]]:
    """For each score shard in order: ``selected`` (bool [T]), ``h``, ``d``, ``soft_or``
    (float32 [T]) and ``quadrant`` (uint8 [T], 1..4) of its tokens."""
    out, shard_offsets = compute_all(score, cfg)
    return split_shards(out, shard_offsets)


def split_shards(out: dict[str, Any], shard_offsets: list) -> list[dict[str, Any]]:
    """Cut whole-directory per-token results back into the score shards' pieces."""
    shard_tokens = [int(o[-1]) for o in shard_offsets]
    names = ("selected", "h", "d", "soft_or", "quadrant")
    pieces = {n: out[n].split(shard_tokens) for n in names}
    return [{n: pieces[n][i] for n in names} for i in range(len(shard_tokens))]


def summarize(out: dict[str, Any], cfg: SelectConfig) -> dict[str, Any]:
    """Manifest summary: strategy, thresholds, kept counts per quadrant."""
    from tipcli.importance import QUADRANT_NAMES

    cand_T = out["response_mask"]
    quad_T, sel_T = out["quadrant"], out["selected"]
    per_q = {}
    for code, name in enumerate(QUADRANT_NAMES, start=1):
        in_q = cand_T & (quad_T == code)
        per_q[name] = {"tokens": int(in_q.sum()), "kept": int((in_q & sel_T).sum())}
    return {
        "strategy": cfg.strategy, "keep": cfg.keep, "scope": cfg.scope,
        "divergence": cfg.divergence, "normalize": cfg.normalize,
        "candidate_tokens": int(cand_T.sum()), "kept_tokens": int(sel_T.sum()),
        "quadrants": per_q,
        "thresholds": {"tau_h": "group median" if cfg.tau_h is None else cfg.tau_h,
                       "tau_d": "group median" if cfg.tau_d is None else cfg.tau_d,
                       "tau_h_per_group": [round(x, 6) for x in out["tau_h"].tolist()],
                       "tau_d_per_group": [round(x, 6) for x in out["tau_d"].tolist()]},
    }


def run_select(cfg: SelectConfig, overwrite: bool = False) -> Path:
    """Write a selection directory for ``cfg.score``; returns its path."""
    from tipcli.shards import StageDir, StageWriter

    score = StageDir.open(cfg.score, stage="score")
    writer = StageWriter(cfg.output, "select", to_dict(cfg), score.manifest["models"],
                         score.manifest["tokenizer"], parent=score, overwrite=overwrite)
    if writer.complete:
        return writer.path
    out, shard_offsets = compute_all(score, cfg)
    for i, part in enumerate(split_shards(out, shard_offsets)):
        if i < writer.num_done:
            continue
        writer.write_shard(i, {"response_offsets": shard_offsets[i], **part},
                           score_shard=score.shards[i]["file"],
                           num_selected=int(part["selected"].sum()))
    return writer.finish(summarize(out, cfg))
