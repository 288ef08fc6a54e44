"""The numbers of a token-importance report, from one read of a score directory.

A selection directory is reported with its own settings and mask; a score directory with
the ``Selection`` settings given (``tip select``'s defaults unless set) and every token
selected. Shape letters: T tokens, C candidate tokens (``response_mask`` true).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tipcli.catalog import BUDGETED_STRATEGIES, QUADRANTS
from tipcli.configs import ReportConfig, SelectConfig, Selection, resolve
from tipcli.errors import ConfigError, TipError
from tipcli.ops.selection import layout, select_mask, sequence_index
from tipcli.stages.select import (
    SELECTION_FIELDS,
    check_statistics,
    load_flat,
    select_tokens,
    teacher_order,
)
from tipcli.store.stagedir import StageDir

COVERAGE_STRATEGIES = BUDGETED_STRATEGIES
COVERAGE_KEEPS = (0.1, 0.2, 0.5)
CURVE_KEEPS = tuple(round(0.05 * i, 2) for i in range(1, 21))
HIST_BINS = 10
FIFTHS = 5
NO_DIVERGENCE = 1e-6  # nats: divergences all at most this are rounding, not a signal
REPORT_FIELDS = (*SELECTION_FIELDS, "student_logprob", "teacher_logprob", "response_ids")


@dataclass
class ReportData:
    """Flat per-token tensors [T] of a score directory and its (possibly default) selection."""

    stage: StageDir       # the directory given
    score: StageDir       # its score directory
    selection: Selection  # the settings behind h, d, quadrants and coverage
    seed: int
    flat: dict[str, Any]  # score fields, response_offsets re-based over the directory
    sel: dict[str, Any]   # h, d, soft_or, quadrant, selected [T]; tau_h, tau_d [G]


def load_report_data(cfg: ReportConfig, prompts: bool = False) -> ReportData:
    """Everything the report needs, reading the score directory once (and its prompts
    only when ``prompts``)."""
    stage = StageDir.open(cfg.path, stage=("score", "select"))
    if stage.stage == "select":
        if cfg.selection != Selection():
            raise TipError(f"{stage.path} is a selection directory: it is reported with its own "
                           "settings; drop the selection flags, or report its score directory")
        score = stage.open_parent("score")
        try:
            stored = resolve(SelectConfig, **stage.config)
        except ConfigError as exc:
            raise TipError(f"{stage.path}/manifest.json holds settings this tip cannot use "
                           f"({exc}); run tip select again") from None
        selection, seed = stored.selection, stored.seed
    else:
        score, selection, seed = stage, cfg.selection, cfg.seed
    check_statistics(score, selection)
    fields = (*REPORT_FIELDS, "prompt_ids") if prompts else REPORT_FIELDS
    flat, _ = load_flat(score, fields)
    sel = select_tokens(flat, selection, seed, score.manifest["tokenizer"]["vocab_size"])
    if stage.stage == "select":
        stored_mask = [s for s in stage.iter_shards(("selected", "h", "d", "soft_or",
                                                     "quadrant"))]
        sel.update({k: torch.cat([s[k] for s in stored_mask]) for k in stored_mask[0]})
    else:
        sel["selected"] = flat["response_mask"].bool().clone()
    return ReportData(stage, score, selection, seed, flat, sel)


def compute_report(data: ReportData) -> dict[str, Any]:
    """Every number the report shows, JSON-ready."""
    st = data.selection
    selected_dir = data.stage.stage == "select"
    return {
        "input": {"path": str(data.stage.path), "stage": data.stage.stage,
                  "strategy": st.strategy if selected_dir else None,
                  "keep": st.keep if selected_dir else None,
                  "divergence": st.divergence, "normalize": st.normalize,
                  "group_size": st.group_size, "scope": st.scope},
        "tokens": {"sequences": int(data.flat["response_offsets"].numel() - 1),
                   "candidates": int(data.flat["response_mask"].sum()),
                   "selected": int(data.sel["selected"].sum())},
        "quadrants": quadrant_table(data),
        "teachers": teacher_tables(data),
        "histogram": histogram(data),
        "coverage": coverage_table(data),
        "curves": coverage_curves(data),
        "positions": position_table(data),
        "median_thresholds": _median_thresholds(data),
        "notes": notes(data),
    }


def notes(data: ReportData) -> list[str]:
    """Warnings about the data itself, one line each: a pair that does not diverge."""
    name = data.selection.divergence
    div_C = data.flat[name][_cand(data)]
    if not div_C.numel() or float(div_C.abs().max()) > NO_DIVERGENCE:
        return []
    return [f"the student and the teacher do not diverge (every token's {name} is at most "
            f"{NO_DIVERGENCE:g}): d carries no signal, so the high/low d split (d = 0 is at "
            "its median, which counts as high) and the strategies that rank by d mean "
            "nothing here; is the teacher the student itself?"]


def _median_thresholds(data: ReportData) -> list[float]:
    """Mean over groups of tau_h and tau_d (the quadrant lines drawn on the heat map)."""
    return [float(data.sel[k].double().mean()) if data.sel[k].numel() else 0.5
            for k in ("tau_h", "tau_d")]


def _cand(data: ReportData) -> torch.Tensor:
    return data.flat["response_mask"].bool()


def _mean(x: torch.Tensor) -> float | None:
    return float(x.double().mean()) if x.numel() else None


def teacher_tables(data: ReportData) -> dict[str, list[dict[str, Any]]]:
    """With several teachers: the quadrant table of each teacher's tokens alone."""
    if "teacher_route" not in data.flat:
        return {}
    names = list(data.score.manifest["models"]["teacher"]["teachers"])
    return {n: quadrant_table(data, data.flat["teacher_route"] == i)
            for i, n in enumerate(names)}


def quadrant_table(data: ReportData, only_T: torch.Tensor | None = None
                   ) -> list[dict[str, Any]]:
    cand_T = _cand(data) if only_T is None else _cand(data) & only_T
    total = max(int(cand_T.sum()), 1)
    div_T = data.flat[data.selection.divergence]
    rows = []
    for code, name in enumerate(QUADRANTS, start=1):
        in_T = cand_T & (data.sel["quadrant"] == code)
        n = int(in_T.sum())
        rows.append({"quadrant": name, "tokens": n, "share": n / total,
                     "mean_entropy": _mean(data.flat["student_entropy"][in_T]),
                     "mean_divergence": _mean(div_T[in_T]),
                     "mean_teacher_logprob": _mean(data.flat["teacher_logprob"][in_T]),
                     "selected": int((in_T & data.sel["selected"]).sum())})
    return rows


def histogram(data: ReportData) -> dict[str, Any]:
    """counts[i][j]: candidate tokens with d in bin i and h in bin j (bins of width 1/10)."""
    cand_T = _cand(data)
    h_bin = (data.sel["h"][cand_T] * HIST_BINS).long().clamp(0, HIST_BINS - 1)
    d_bin = (data.sel["d"][cand_T] * HIST_BINS).long().clamp(0, HIST_BINS - 1)
    counts = torch.bincount(d_bin * HIST_BINS + h_bin, minlength=HIST_BINS * HIST_BINS)
    edges = [round(i / HIST_BINS, 4) for i in range(HIST_BINS + 1)]
    return {"h_edges": edges, "d_edges": edges,
            "counts": counts.view(HIST_BINS, HIST_BINS).tolist()}


def _candidates(data: ReportData):
    """Candidate-token arrays and the budget scope, as importance() lays them out (with
    several teachers, teacher by teacher: ``teacher_order``)."""
    order_T, off_N1, segments = teacher_order(data.flat)
    take = (lambda x: x) if order_T is None else (lambda x: x[order_T])
    cand_T = take(_cand(data))
    seqs, groups = layout(off_N1, cand_T, data.selection.group_size, segments)
    arrays = {k: take(data.sel[k])[cand_T] for k in ("h", "d", "soft_or", "quadrant")}
    arrays["fkl"] = take(data.flat["fkl"])[cand_T]
    arrays["div"] = take(data.flat[data.selection.divergence])[cand_T].double()
    return arrays, seqs if data.selection.scope == "sequence" else groups


def _mask(arrays, scope, strategy: str, keep: float, data: ReportData) -> torch.Tensor:
    return select_mask(strategy, keep, arrays["h"], arrays["d"], arrays["soft_or"],
                       arrays["quadrant"], arrays["fkl"], scope, data.selection.alpha, data.seed)


def coverage_table(data: ReportData) -> list[dict[str, Any]]:
    """Per strategy and keep: divergence mass kept, Q3 tokens kept, overlap with entropy."""
    arrays, scope = _candidates(data)
    mass = float(arrays["div"].sum())
    q3_C = arrays["quadrant"] == 3
    rows = []
    for keep in COVERAGE_KEEPS:
        ent_C = _mask(arrays, scope, "entropy", keep, data)
        for strategy in COVERAGE_STRATEGIES:
            sel_C = _mask(arrays, scope, strategy, keep, data)
            n = int(sel_C.sum())
            rows.append({
                "strategy": strategy, "keep": keep, "selected": n,
                "divergence_mass": float(arrays["div"][sel_C].sum()) / mass if mass else None,
                "q3_kept": int((sel_C & q3_C).sum()) / int(q3_C.sum()) if q3_C.any() else None,
                "overlap_entropy": int((sel_C & ent_C).sum()) / n if n else None})
    return rows


def coverage_curves(data: ReportData) -> dict[str, Any]:
    """Kept divergence mass against keep ratio, one curve per strategy."""
    arrays, scope = _candidates(data)
    mass = float(arrays["div"].sum()) or 1.0
    curves = {s: [float(arrays["div"][_mask(arrays, scope, s, k, data)].sum()) / mass
                  for k in CURVE_KEEPS] for s in COVERAGE_STRATEGIES}
    return {"keep": list(CURVE_KEEPS), "divergence_mass": curves}


def position_table(data: ReportData) -> list[dict[str, Any]]:
    """Quadrant shares of candidate tokens in each fifth of the response (by position)."""
    off_N1 = data.flat["response_offsets"]
    seq_T = sequence_index(off_N1)
    pos_T = torch.arange(seq_T.numel()) - off_N1[seq_T]
    len_T = off_N1.diff()[seq_T]
    fifth_T = (pos_T * FIFTHS) // len_T.clamp(min=1)
    cand_T = _cand(data)
    rows = []
    for f in range(FIFTHS):
        in_T = cand_T & (fifth_T == f)
        n = int(in_T.sum())
        row: dict[str, Any] = {"fifth": f + 1, "tokens": n}
        for code, name in enumerate(QUADRANTS, start=1):
            k = int((in_T & (data.sel["quadrant"] == code)).sum())
            row[name] = k / n if n else None
        rows.append(row)
    return rows


def export_rows(data: ReportData, tok) -> list[dict[str, Any]]:
    """One dict per response: ids, decoded text and equal-length per-token lists."""
    names = {"entropy": data.flat["student_entropy"]}
    names.update({k: data.flat[k] for k in ("rkl", "fkl", "jsd", "student_logprob",
                                             "teacher_logprob")})
    names.update({k: data.sel[k] for k in ("h", "d", "soft_or", "quadrant", "selected")})
    lists = {k: v.tolist() for k, v in names.items()}
    off = data.flat["response_offsets"].tolist()
    ids_T = data.flat["response_ids"].tolist()
    rows = []
    for i in range(len(off) - 1):
        a, b = off[i], off[i + 1]
        row = {"sequence": i, "prompt_ids": data.flat["prompt_ids"][i].tolist(),
               "response_ids": ids_T[a:b], "response_text": tok.decode(ids_T[a:b])}
        row.update({k: lists[k][a:b] for k in lists})
        row["quadrant"] = [QUADRANTS[q - 1] for q in row["quadrant"]]
        rows.append(row)
    return rows
