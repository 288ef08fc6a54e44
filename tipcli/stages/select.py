"""`tip select`: choose the response tokens to train on (a selection directory).

    tip select runs/score --strategy soft-or --keep 0.5 -o runs/select

Computes normalised entropy h and divergence d for every response token of a score
directory (see ``tipcli.ops.selection`` and docs/selection.md), their Soft-OR score and quadrant,
and the mask a strategy keeps. Mask shard i points at score shard i (same sequences,
same ``response_offsets``) and holds only ``selected``, ``h``, ``d``, ``soft_or`` and
``quadrant``; nothing of the score data is copied. Normalisation groups of
``group_size`` consecutive sequences follow the whole directory's sequence order, so a
group may span shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tipcli.catalog import QUADRANTS
from tipcli.configs import SelectConfig, Selection
from tipcli.errors import TipError
from tipcli.ops.selection import sequence_index, token_importance
from tipcli.progress import console
from tipcli.store.layout import SELECT
from tipcli.store.stagedir import PROMPT_TOKEN_FIELDS, StageDir, StageWriter

# what selection reads from a score directory, and what a selection shard holds
SELECTION_FIELDS = ("response_offsets", "response_mask", "student_entropy", "rkl", "fkl", "jsd")
MASK_FIELDS = ("selected", "h", "d", "soft_or", "quadrant")
SELECT_TENSORS = ("response_offsets", *MASK_FIELDS)


def load_flat(score: StageDir, fields: tuple[str, ...] = SELECTION_FIELDS
              ) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """One pass over a score directory: its per-token ``fields`` concatenated in sequence
    order (``response_offsets`` [N+1] re-based over the whole directory; ``prompt_ids``, if
    asked for, as a list of one tensor per sequence) and each shard's response offsets."""
    if "teachers" in score.manifest["models"].get("teacher", {}):  # several: each token's
        fields = (*fields, "teacher_route")
    wanted = tuple(dict.fromkeys((*fields, "response_offsets", "prompt_offsets")
                                 if "prompt_ids" in fields else (*fields, "response_offsets")))
    parts: dict[str, list] = {f: [] for f in wanted if f not in ("response_offsets",
                                                                  "prompt_offsets")}
    shard_offsets = []
    for shard in score.iter_shards(wanted):
        shard_offsets.append(shard["response_offsets"])
        for f in parts:
            if f in PROMPT_TOKEN_FIELDS:
                off = shard["prompt_offsets"].tolist()
                parts[f] += [shard[f][a:b] for a, b in zip(off, off[1:])]
            else:
                parts[f].append(shard[f])
    flat = {f: v if f in PROMPT_TOKEN_FIELDS else torch.cat(v) for f, v in parts.items()}
    lengths_N = torch.cat([o.diff() for o in shard_offsets])
    flat["response_offsets"] = torch.cat([lengths_N.new_zeros(1), lengths_N.cumsum(0)])
    return flat, shard_offsets


def check_statistics(score: StageDir, sel: Selection) -> None:
    """Refuse a selection setting that needs an exact statistic ``score`` does not hold:
    with a served teacher the divergences are top-k estimates (lower bounds), with a teacher
    of another tokenizer span estimates; both still rank the tokens of a group (minmax,
    rank) but are no absolute scale (bound)."""
    kind = score.manifest["summary"].get("statistics", {}).get(sel.divergence, "exact")
    if kind != "exact" and sel.normalize == "bound":
        raise TipError(f"--normalize bound reads the exact {sel.divergence} on an absolute "
                       f"scale, but {score.path} holds a {kind} of it (a served teacher, or "
                       "one with another tokenizer): use --normalize minmax or rank")


def teacher_order(flat: dict[str, Any]
                  ) -> tuple[torch.Tensor | None, torch.Tensor, list[int] | None]:
    """With several teachers (``teacher_route``): the tokens taken teacher by teacher
    (order_T [T], each teacher's sequences in directory order), their response offsets in
    that order and each teacher's first sequence there; else (None, the offsets, None)."""
    off_N1 = flat["response_offsets"]
    if "teacher_route" not in flat or flat["teacher_route"].unique().numel() < 2:
        return None, off_N1, None
    lengths_N = off_N1.diff()
    # every token of a sequence has its teacher: a scatter of equal values
    route_N = torch.zeros(lengths_N.numel(), dtype=torch.long).scatter_(
        0, sequence_index(off_N1), flat["teacher_route"].long())
    seq_order = torch.sort(route_N, stable=True).indices
    order_T = torch.cat([torch.arange(int(off_N1[n]), int(off_N1[n + 1]))
                         for n in seq_order.tolist()])
    lengths = lengths_N[seq_order]
    segments = torch.bincount(route_N).cumsum(0)[:-1].tolist()
    return order_T, torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]), segments


def select_tokens(flat: dict[str, Any], sel: Selection, seed: int,
                  vocab_size: int) -> dict[str, Any]:
    """Per-token h, d, soft_or, quadrant, selected [T] and per-group tau_h, tau_d of the
    flat fields of a whole score directory. With several teachers (``teacher_route``) the
    groups never mix them: the sequences are taken teacher by teacher (each teacher's in
    directory order), grouped, and the results put back in place."""
    fields = ("response_mask", "student_entropy", sel.divergence, "fkl")
    order_T, off_N1, segments = teacher_order(flat)
    take = (lambda x: x) if order_T is None else (lambda x: x[order_T])
    mask, ent, div, fkl = (take(flat[f]) for f in fields)
    out = token_importance(off_N1, mask, ent, div, fkl, sel, seed, vocab_size, segments)
    if order_T is not None:
        for k in ("h", "d", "soft_or", "quadrant", "selected"):
            back = torch.empty_like(out[k])
            back[order_T] = out[k]
            out[k] = back
    out["response_mask"] = flat["response_mask"].bool()
    return out


def selection_by_shard(score: StageDir, sel: Selection, seed: int) -> list[dict[str, Any]]:
    """For each score shard in order: ``selected`` (bool [T]), ``h``, ``d``, ``soft_or``
    (float32 [T]) and ``quadrant`` (uint8 [T], 1..4) of its tokens."""
    flat, shard_offsets = load_flat(score)
    out = select_tokens(flat, sel, seed, score.manifest["tokenizer"]["vocab_size"])
    return split_shards(out, shard_offsets)


def split_shards(out: dict[str, Any], shard_offsets: list) -> list[dict[str, Any]]:
    """Cut whole-directory per-token results back into the score shards' pieces."""
    shard_tokens = [int(o[-1]) for o in shard_offsets]
    pieces = {n: out[n].split(shard_tokens) for n in MASK_FIELDS}
    return [{n: pieces[n][i] for n in MASK_FIELDS} for i in range(len(shard_tokens))]


def summarize(out: dict[str, Any], sel: Selection) -> dict[str, Any]:
    """Manifest summary: strategy, thresholds, kept counts per quadrant."""
    cand_T = out["response_mask"]
    quad_T, sel_T = out["quadrant"], out["selected"]
    per_q = {}
    for code, name in enumerate(QUADRANTS, start=1):
        in_q = cand_T & (quad_T == code)
        per_q[name] = {"tokens": int(in_q.sum()), "kept": int((in_q & sel_T).sum())}
    return {
        "strategy": sel.strategy, "keep": sel.keep, "scope": sel.scope,
        "divergence": sel.divergence, "normalize": sel.normalize,
        "candidate_tokens": int(cand_T.sum()), "kept_tokens": int(sel_T.sum()),
        "quadrants": per_q,
        "thresholds": {"tau_h": "group median" if sel.tau_h is None else sel.tau_h,
                       "tau_d": "group median" if sel.tau_d is None else sel.tau_d,
                       "tau_h_per_group": [round(x, 6) for x in out["tau_h"].tolist()],
                       "tau_d_per_group": [round(x, 6) for x in out["tau_d"].tolist()]},
    }


def run_select(cfg: SelectConfig, overwrite: bool = False) -> Path:
    """Write a selection directory for ``cfg.score``; returns its path."""
    run = StageWriter.for_run(SELECT, cfg, overwrite)
    score = StageDir.open(cfg.score, stage="score", verify=cfg.checks.verify_checksums)
    check_statistics(score, cfg.selection)
    writer = run.start(score.manifest["models"], score.manifest["tokenizer"], parent=score)
    if writer.complete:
        return writer.path
    flat, shard_offsets = load_flat(score)
    out = select_tokens(flat, cfg.selection, cfg.seed, score.manifest["tokenizer"]["vocab_size"])
    for i, part in enumerate(split_shards(out, shard_offsets)):
        if writer.is_done(i):
            continue
        writer.write_shard(i, {"response_offsets": shard_offsets[i], **part},
                           score_shard=score.shards[i]["file"],
                           num_selected=int(part["selected"].sum()))
    return writer.finish(summarize(out, cfg.selection), num_shards=len(shard_offsets))


def run_select_cli(cfg: SelectConfig, overwrite: bool = False) -> Path:
    """``run_select`` for the command line: one summary line on stderr, then the path."""
    path = run_select(cfg, overwrite)
    s = StageDir.open(path, stage="select").manifest["summary"]
    share = s["kept_tokens"] / max(s["candidate_tokens"], 1)
    console.print(f"select: kept {s['kept_tokens']} of {s['candidate_tokens']} candidate tokens "
                  f"({share:.1%}), strategy {s['strategy']}, keep {s['keep']:g}", markup=False,
                  highlight=False, soft_wrap=True)
    return path
