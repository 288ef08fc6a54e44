"""`tip report`: what the token-importance signals look like in a score or selection dir.

    tip report runs/select --json report.json --png report.png --export tokens.parquet --show 3

Tables on stderr: tokens per quadrant with mean entropy, divergence and teacher
log-prob; a heat table of the (h, d) histogram; for every strategy at keep 0.1/0.2/0.5
the share of total divergence mass it keeps, the share of Q3 tokens it keeps and its
overlap with entropy-only; the quadrants over position-in-response fifths. A selection
directory is reported with its own settings and mask; a score directory with the
default selection settings (``tip select``'s defaults) and every token selected.
Stdout gets only the input directory (last line), like every other stage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tipcli.config import option

COVERAGE_STRATEGIES = ("random", "entropy", "entropy-sample", "divergence", "soft-or",
                       "soft-or-bottom", "q3")
COVERAGE_KEEPS = (0.1, 0.2, 0.5)
CURVE_KEEPS = tuple(round(0.05 * i, 2) for i in range(1, 21))
HIST_BINS = 10
FIFTHS = 5
QUADRANT_STYLES = {1: "red", 2: "yellow", 3: "magenta", 4: "blue"}
SCORE_FIELDS = ("response_offsets", "response_mask", "student_entropy", "rkl", "fkl", "jsd",
                "student_logprob", "teacher_logprob")
EXPORT_TOKEN_FIELDS = ("entropy", "rkl", "fkl", "jsd", "student_logprob", "teacher_logprob",
                       "h", "d", "soft_or", "quadrant", "selected")


@dataclass(frozen=True)
class ReportConfig:
    path: str = option("", "Score or selection directory.")
    json: str = option("", "Write every number shown to this JSON file.")
    png: str = option("", "Write the (h, d) heat map and coverage curves to this PNG file.")
    export: str = option("", "Write one row per response to this .jsonl or .parquet file.")
    show: int = option(0, "Print N responses, tokens coloured by quadrant, selected underlined.")

    def validate(self) -> list[str]:
        p = []
        if not self.path:
            p.append("a score or selection directory is required")
        if self.export and Path(self.export).suffix not in (".jsonl", ".parquet"):
            p.append("--export must end in .jsonl or .parquet")
        if self.show < 0:
            p.append("--show must be >= 0")
        return p


# ----------------------------------------------------------------------------- loading


@dataclass
class ReportData:
    """Flat per-token tensors [T] of a score directory and its (possibly default) selection."""

    stage: Any            # the StageDir given
    score: Any            # its score StageDir
    settings: Any         # tipcli.importance.Settings used for h, d, quadrants, coverage
    flat: dict[str, Any]  # score fields, response_offsets re-based over the directory
    sel: dict[str, Any]   # h, d, soft_or, quadrant, selected [T]; tau_h, tau_d [G]


def load_report_data(path: str | Path) -> ReportData:
    from tipcli.select import SelectConfig, compute_all, load_flat
    from tipcli.shards import StageDir

    stage = StageDir.open(path, stage=("score", "select"))
    if stage.stage == "select":
        score = StageDir.open(stage.manifest["parent"]["path"], stage="score")
        cfg = SelectConfig(**stage.config)
    else:
        score, cfg = stage, SelectConfig(score=str(path), output="-")
    flat, _ = load_flat(score, SCORE_FIELDS)
    sel, _ = compute_all(score, cfg)
    if stage.stage == "select":
        sel.update(_stored_selection(stage))
    else:
        sel["selected"] = flat["response_mask"].bool().clone()
    return ReportData(stage, score, cfg.settings(), flat, sel)


def _stored_selection(select_dir) -> dict[str, Any]:
    import torch

    parts: dict[str, list] = {}
    for shard in select_dir.iter_shards():
        for name in ("selected", "h", "d", "soft_or", "quadrant"):
            parts.setdefault(name, []).append(shard[name])
    return {k: torch.cat(v) for k, v in parts.items()}


# ----------------------------------------------------------------------------- numbers


def compute_report(data: ReportData) -> dict[str, Any]:
    """Every number the report shows, JSON-ready."""
    st = data.settings
    return {
        "input": {"path": str(data.stage.path), "stage": data.stage.stage,
                  "strategy": st.strategy if data.stage.stage == "select" else None,
                  "keep": st.keep if data.stage.stage == "select" else None,
                  "divergence": st.divergence, "normalize": st.normalize,
                  "group_size": st.group_size, "scope": st.scope},
        "tokens": {"sequences": int(data.flat["response_offsets"].numel() - 1),
                   "candidates": int(data.flat["response_mask"].sum()),
                   "selected": int(data.sel["selected"].sum())},
        "quadrants": quadrant_table(data),
        "histogram": histogram(data),
        "coverage": coverage_table(data),
        "curves": coverage_curves(data),
        "positions": position_table(data),
        "median_thresholds": _median_thresholds(data),
    }


def _median_thresholds(data: ReportData) -> list[float]:
    """Mean over groups of tau_h and tau_d (the quadrant lines drawn on the heat map)."""
    return [float(data.sel[k].double().mean()) if data.sel[k].numel() else 0.5
            for k in ("tau_h", "tau_d")]


def _cand(data: ReportData):
    return data.flat["response_mask"].bool()


def quadrant_table(data: ReportData) -> list[dict[str, Any]]:
    cand_T = _cand(data)
    total = max(int(cand_T.sum()), 1)
    div_T = data.flat[data.settings.divergence]
    rows = []
    for code in range(1, 5):
        in_T = cand_T & (data.sel["quadrant"] == code)
        n = int(in_T.sum())
        rows.append({"quadrant": f"Q{code}", "tokens": n, "share": n / total,
                     "mean_entropy": _mean(data.flat["student_entropy"][in_T]),
                     "mean_divergence": _mean(div_T[in_T]),
                     "mean_teacher_logprob": _mean(data.flat["teacher_logprob"][in_T]),
                     "selected": int((in_T & data.sel["selected"]).sum())})
    return rows


def _mean(x) -> float | None:
    return float(x.double().mean()) if x.numel() else None


def histogram(data: ReportData) -> dict[str, Any]:
    """counts[i][j]: candidate tokens with d in bin i and h in bin j (bins of width 1/10)."""
    import torch

    cand_T = _cand(data)
    h_bin = (data.sel["h"][cand_T] * HIST_BINS).long().clamp(0, HIST_BINS - 1)
    d_bin = (data.sel["d"][cand_T] * HIST_BINS).long().clamp(0, HIST_BINS - 1)
    counts = torch.bincount(d_bin * HIST_BINS + h_bin, minlength=HIST_BINS * HIST_BINS)
    edges = [round(i / HIST_BINS, 4) for i in range(HIST_BINS + 1)]
    return {"h_edges": edges, "d_edges": edges,
            "counts": counts.view(HIST_BINS, HIST_BINS).tolist()}


def _candidates(data: ReportData):
    """Candidate-token arrays and the budget scope, as importance() lays them out."""
    from tipcli.importance import layout

    cand_T = _cand(data)
    seqs, groups = layout(data.flat["response_offsets"], cand_T, data.settings.group_size)
    arrays = {k: data.sel[k][cand_T] for k in ("h", "d", "soft_or", "quadrant")}
    arrays["fkl"] = data.flat["fkl"][cand_T]
    arrays["div"] = data.flat[data.settings.divergence][cand_T].double()
    return arrays, seqs if data.settings.scope == "sequence" else groups


def _mask(arrays, scope, strategy: str, keep: float, st):
    from tipcli.importance import select_mask

    return select_mask(strategy, keep, arrays["h"], arrays["d"], arrays["soft_or"],
                       arrays["quadrant"], arrays["fkl"], scope, st.alpha, st.seed)


def coverage_table(data: ReportData) -> list[dict[str, Any]]:
    """Per strategy and keep: divergence mass kept, Q3 tokens kept, overlap with entropy."""
    arrays, scope = _candidates(data)
    mass = float(arrays["div"].sum())
    q3_C = arrays["quadrant"] == 3
    rows = []
    for keep in COVERAGE_KEEPS:
        ent_C = _mask(arrays, scope, "entropy", keep, data.settings)
        for strategy in COVERAGE_STRATEGIES:
            sel_C = _mask(arrays, scope, strategy, keep, data.settings)
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
    curves = {s: [float(arrays["div"][_mask(arrays, scope, s, k, data.settings)].sum()) / mass
                  for k in CURVE_KEEPS] for s in COVERAGE_STRATEGIES}
    return {"keep": list(CURVE_KEEPS), "divergence_mass": curves}


def position_table(data: ReportData) -> list[dict[str, Any]]:
    """Quadrant shares of candidate tokens in each fifth of the response (by position)."""
    import torch

    from tipcli.importance import sequence_index

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
        row = {"fifth": f + 1, "tokens": n}
        for code in range(1, 5):
            k = int((in_T & (data.sel["quadrant"] == code)).sum())
            row[f"Q{code}"] = k / n if n else None
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- run


def run_report(cfg: ReportConfig) -> dict[str, Any]:
    """Compute, render on stderr and write the requested files; returns the numbers."""
    data = load_report_data(cfg.path)
    numbers = compute_report(data)
    render_tables(numbers)
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(numbers, indent=2) + "\n")
    if cfg.png:
        write_png(numbers, cfg.png)
    if cfg.export or cfg.show:
        tok = _tokenizer(data)
        if cfg.export:
            write_export(data, tok, cfg.export)
        if cfg.show:
            show_responses(data, tok, cfg.show)
    return numbers


def _tokenizer(data: ReportData):
    from tipcli.models import load_tokenizer

    return load_tokenizer(data.score.config["student"],
                          data.score.config.get("trust_remote_code", False))


# ----------------------------------------------------------------------------- terminal


def _fmt(x, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def render_tables(numbers: dict[str, Any]) -> None:
    """Every table of the report, with rich, on stderr."""
    from tipcli.progress import console

    for table in (_quadrant_rich(numbers), _histogram_rich(numbers), _coverage_rich(numbers),
                  _position_rich(numbers)):
        console.print(table)


def _quadrant_rich(numbers):
    from rich.table import Table

    inp, tok = numbers["input"], numbers["tokens"]
    title = (f"{inp['path']} ({inp['stage']}): {tok['candidates']} tokens in "
             f"{tok['sequences']} responses, {tok['selected']} selected; "
             f"d = {inp['divergence']}, {inp['normalize']} over groups of {inp['group_size']}")
    t = Table(title=title, title_justify="left")
    for col in ("quadrant", "tokens", "share", "mean entropy", f"mean {inp['divergence']}",
                "mean teacher logprob", "selected"):
        t.add_column(col, justify="left" if col == "quadrant" else "right")
    names = {1: "Q1 high h, high d", 2: "Q2 high h, low d", 3: "Q3 low h, high d",
             4: "Q4 low h, low d"}
    for i, r in enumerate(numbers["quadrants"], start=1):
        t.add_row(names[i], str(r["tokens"]), _fmt(r["share"], True), _fmt(r["mean_entropy"]),
                  _fmt(r["mean_divergence"]), _fmt(r["mean_teacher_logprob"]),
                  str(r["selected"]), style=QUADRANT_STYLES[i])
    return t


def _histogram_rich(numbers):
    from rich.table import Table

    counts = numbers["histogram"]["counts"]
    top = max(max(row) for row in counts) or 1
    t = Table(title="tokens by (h, d): rows d high to low, columns h low to high",
              title_justify="left")
    t.add_column("d \\ h", justify="right")
    for j in range(HIST_BINS):
        t.add_column(f"{j / HIST_BINS:.1f}", justify="right")
    for i in reversed(range(HIST_BINS)):
        cells = [f"[on {_heat(c / top)}]{c}[/]" if c else "." for c in counts[i]]
        t.add_row(f"{i / HIST_BINS:.1f}", *cells)
    return t


def _heat(x: float) -> str:
    """A background colour from dark blue (few) to red (many)."""
    shades = ("grey23", "navy_blue", "blue3", "dark_cyan", "green4", "gold3", "dark_orange3",
              "red3")
    return shades[min(int(x * len(shades)), len(shades) - 1)]


def _coverage_rich(numbers):
    from rich.table import Table

    t = Table(title="strategies: divergence mass kept / Q3 tokens kept / overlap with entropy",
              title_justify="left")
    t.add_column("strategy")
    for keep in COVERAGE_KEEPS:
        t.add_column(f"keep {keep:g}", justify="right")
    for strategy in COVERAGE_STRATEGIES:
        cells = []
        for keep in COVERAGE_KEEPS:
            r = next(r for r in numbers["coverage"] if r["strategy"] == strategy
                     and r["keep"] == keep)
            cells.append(" / ".join(_fmt(r[k], True) for k in
                                    ("divergence_mass", "q3_kept", "overlap_entropy")))
        t.add_row(strategy, *cells)
    return t


def _position_rich(numbers):
    from rich.table import Table

    t = Table(title="quadrant shares by position in the response", title_justify="left")
    t.add_column("fifth")
    t.add_column("tokens", justify="right")
    for code in range(1, 5):
        t.add_column(f"Q{code}", justify="right", style=QUADRANT_STYLES[code])
    for r in numbers["positions"]:
        t.add_row(f"{r['fifth']}/5", str(r["tokens"]),
                  *(_fmt(r[f"Q{c}"], True) for c in range(1, 5)))
    return t


def show_responses(data: ReportData, tok, n: int) -> None:
    """N responses, each token coloured by quadrant; selected tokens bold and underlined."""
    from rich.text import Text

    from tipcli.progress import console

    legend = Text("legend: ")
    for code, style in QUADRANT_STYLES.items():
        legend.append(f"Q{code} ", style=style)
    legend.append("selected", style="bold underline")
    console.print(legend)
    off = data.flat["response_offsets"].tolist()
    ids_T = _response_ids(data)
    for i in range(min(n, len(off) - 1)):
        text = Text(f"[{i}] ")
        for t in range(off[i], off[i + 1]):
            style = QUADRANT_STYLES[int(data.sel["quadrant"][t])]
            if data.sel["selected"][t]:
                style += " bold underline"
            text.append(tok.decode([int(ids_T[t])]), style=style)
        console.print(text)


def _response_ids(data: ReportData):
    import torch

    return torch.cat([s["response_ids"] for s in data.score.iter_shards()])


# ----------------------------------------------------------------------------- files


def write_png(numbers: dict[str, Any], path: str | Path) -> None:
    """(h, d) heat map with the quadrant lines, and kept divergence mass vs keep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    counts = np.asarray(numbers["histogram"]["counts"], dtype=float)
    # token counts span orders of magnitude (most tokens sit near h = d = 0): log colours
    im = ax1.imshow(np.where(counts > 0, counts, np.nan), origin="lower", extent=(0, 1, 0, 1),
                    cmap="viridis", aspect="auto", norm=LogNorm(vmin=1, vmax=max(counts.max(), 1)))
    fig.colorbar(im, ax=ax1, label="tokens")
    tau_h, tau_d = numbers.get("median_thresholds", (0.5, 0.5))
    ax1.axvline(tau_h, color="white", ls="--")
    ax1.axhline(tau_d, color="white", ls="--")
    hi_h, lo_h, hi_d, lo_d = (1 + tau_h) / 2, tau_h / 2, (1 + tau_d) / 2, tau_d / 2
    for x, y, name in ((hi_h, hi_d, "Q1"), (hi_h, lo_d, "Q2"), (lo_h, hi_d, "Q3"),
                       (lo_h, lo_d, "Q4")):
        ax1.text(x, y, name, color="white", ha="center", va="center", fontsize=12)
    ax1.set(xlabel="h (normalised entropy)", ylabel="d (normalised divergence)",
            title="tokens by (h, d)")
    curves = numbers["curves"]
    for strategy, ys in curves["divergence_mass"].items():
        ax2.plot(curves["keep"], ys, label=strategy)
    ax2.plot([0, 1], [0, 1], color="grey", lw=0.5)
    ax2.set(xlabel="keep ratio", ylabel="share of divergence mass kept",
            title="coverage", xlim=(0, 1), ylim=(0, 1.01))
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def export_rows(data: ReportData, tok) -> list[dict[str, Any]]:
    """One dict per response: ids, decoded text and equal-length per-token lists."""
    names = {"entropy": data.flat["student_entropy"]}
    names.update({k: data.flat[k] for k in ("rkl", "fkl", "jsd", "student_logprob",
                                             "teacher_logprob")})
    names.update({k: data.sel[k] for k in ("h", "d", "soft_or", "quadrant", "selected")})
    lists = {k: v.tolist() for k, v in names.items()}
    off = data.flat["response_offsets"].tolist()
    prompts = _prompts(data)
    ids_T = _response_ids(data).tolist()
    rows = []
    for i in range(len(off) - 1):
        a, b = off[i], off[i + 1]
        row = {"sequence": i, "prompt_ids": prompts[i], "response_ids": ids_T[a:b],
               "response_text": tok.decode(ids_T[a:b])}
        row.update({k: lists[k][a:b] for k in EXPORT_TOKEN_FIELDS})
        row["quadrant"] = [f"Q{q}" for q in row["quadrant"]]
        rows.append(row)
    return rows


def _prompts(data: ReportData) -> list[list[int]]:
    out = []
    for shard in data.score.iter_shards():
        off = shard["prompt_offsets"].tolist()
        ids = shard["prompt_ids"].tolist()
        out += [ids[off[i]:off[i + 1]] for i in range(len(off) - 1)]
    return out


def write_export(data: ReportData, tok, path: str | Path) -> None:
    rows = export_rows(data, tok)
    path = Path(path)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
