"""Drawing a token-importance report: rich tables on stderr, a PNG, an export, examples.

    tip report runs/select --json report.json --png report.png --export tokens.parquet --show 3
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.table import Table
from rich.text import Text

from tipcli.catalog import QUADRANT_LABELS
from tipcli.progress import console
from tipcli.stages.report.compute import (
    COVERAGE_KEEPS,
    COVERAGE_STRATEGIES,
    HIST_BINS,
    ReportData,
    export_rows,
)
from tipcli.store.files import write_atomic

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)
from matplotlib.colors import LogNorm  # noqa: E402

QUADRANT_STYLES = {1: "red", 2: "yellow", 3: "magenta", 4: "blue"}


# ----------------------------------------------------------------------------- terminal


def _fmt(x, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def render_tables(numbers: dict[str, Any]) -> None:
    """Every table of the report, with rich, on stderr."""
    per_teacher = [_quadrant_rich(numbers, name, rows)
                   for name, rows in numbers.get("teachers", {}).items()]
    for table in (_quadrant_rich(numbers), *per_teacher, _histogram_rich(numbers),
                  _coverage_rich(numbers), _position_rich(numbers)):
        console.print(table)
    for note in numbers.get("notes", ()):
        console.print(f"note: {note}", style="yellow", markup=False, highlight=False,
                      soft_wrap=True)


def _quadrant_rich(numbers, teacher: str | None = None, rows=None):
    """The quadrant table: of every token, or (several teachers) of ``teacher``'s."""
    inp, tok = numbers["input"], numbers["tokens"]
    title = (f"{inp['path']} ({inp['stage']}): {tok['candidates']} tokens in "
             f"{tok['sequences']} responses, {tok['selected']} selected; "
             f"d = {inp['divergence']}, {inp['normalize']} over groups of {inp['group_size']}")
    if teacher is not None:
        title = (f"teacher {teacher}: {sum(r['tokens'] for r in rows)} tokens, "
                 f"{sum(r['selected'] for r in rows)} selected")
    t = Table(title=title, title_justify="left")
    for col in ("quadrant", "tokens", "share", "mean entropy", f"mean {inp['divergence']}",
                "mean teacher logprob", "selected"):
        t.add_column(col, justify="left" if col == "quadrant" else "right")
    for i, r in enumerate(numbers["quadrants"] if rows is None else rows, start=1):
        t.add_row(f"{r['quadrant']} {QUADRANT_LABELS[r['quadrant']]}", str(r["tokens"]),
                  _fmt(r["share"], True), _fmt(r["mean_entropy"]), _fmt(r["mean_divergence"]),
                  _fmt(r["mean_teacher_logprob"]), str(r["selected"]), style=QUADRANT_STYLES[i])
    return t


def _histogram_rich(numbers):
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
    legend = Text("legend: ")
    for code, style in QUADRANT_STYLES.items():
        legend.append(f"Q{code} ", style=style)
    legend.append("selected", style="bold underline")
    console.print(legend)
    off = data.flat["response_offsets"].tolist()
    ids_T = data.flat["response_ids"]
    for i in range(min(n, len(off) - 1)):
        text = Text(f"[{i}] ")
        for t in range(off[i], off[i + 1]):
            style = QUADRANT_STYLES[int(data.sel["quadrant"][t])]
            if data.sel["selected"][t]:
                style += " bold underline"
            text.append(tok.decode([int(ids_T[t])]), style=style)
        console.print(text)


# ----------------------------------------------------------------------------- files


def write_png(numbers: dict[str, Any], path: str | Path) -> None:
    """The report's figure (``figure``) as a PNG file."""
    fig = figure(numbers)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def figure(numbers: dict[str, Any]):
    """(h, d) heat map with the quadrant lines, and kept divergence mass vs keep; the title
    names the directory, its strategy and keep."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 5))
    counts = np.asarray(numbers["histogram"]["counts"], dtype=float)
    # token counts span orders of magnitude (most tokens sit near h = d = 0): log colours
    im = ax1.imshow(np.where(counts > 0, counts, np.nan), origin="lower", extent=(0, 1, 0, 1),
                    cmap="viridis", aspect="auto", norm=LogNorm(vmin=1, vmax=max(counts.max(), 1)))
    fig.colorbar(im, ax=ax1, label="tokens")
    _quadrant_labels(ax1, numbers)
    ax1.set(xlabel="h (normalised entropy)", ylabel="d (normalised divergence)",
            title="tokens by (h, d)")
    fig.suptitle(png_title(numbers), fontsize=11)
    curves = numbers["curves"]
    for strategy, ys in curves["divergence_mass"].items():
        ax2.plot(curves["keep"], ys, label=strategy)
    ax2.plot([0, 1], [0, 1], color="grey", lw=0.5)
    ax2.set(xlabel="keep ratio", ylabel="share of divergence mass kept",
            title="coverage", xlim=(0, 1), ylim=(0, 1.01))
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig


def png_title(numbers: dict[str, Any]) -> str:
    """The run (the directory's last two names), its strategy and keep, and any note."""
    inp = numbers["input"]
    where = "/".join(Path(inp["path"]).parts[-2:])
    what = (f"strategy {inp['strategy']}, keep {inp['keep']:g}" if inp["strategy"] else
            "every token (a score directory: no selection)")
    note = "\nthe student and the teacher do not diverge: d carries no signal" \
        if numbers.get("notes") else ""
    return f"{where} ({inp['stage']}): {what}; d = {inp['divergence']}{note}"


def labelled_quadrants(tau_h: float, tau_d: float) -> list[tuple[str, bool, bool]]:
    """(name, high h, high d) of the quadrants the map has room for: "high" is at or above
    the threshold, so a threshold of 0 leaves no low side."""
    return [(name, high_h, high_d) for name, high_h, high_d in (
        ("Q1", True, True), ("Q2", True, False), ("Q3", False, True), ("Q4", False, False))
        if (high_h or tau_h > 0) and (high_d or tau_d > 0)]


def _quadrant_labels(ax, numbers: dict[str, Any]) -> None:
    """The median lines, and each quadrant's name and share in its corner of the map, by
    the table's rule ("high" = at or above the threshold): a side with no room (a
    threshold of 0, where every token is high) gets no label."""
    tau_h, tau_d = numbers.get("median_thresholds", (0.5, 0.5))
    ax.axvline(tau_h, color="black", ls="--", lw=1)
    ax.axhline(tau_d, color="black", ls="--", lw=1)
    share = {r["quadrant"]: r["share"] for r in numbers["quadrants"]}
    for name, high_h, high_d in labelled_quadrants(tau_h, tau_d):
        ax.text(0.98 if high_h else 0.02, 0.97 if high_d else 0.03,
                f"{name} {100 * share.get(name, 0):.0f}%", transform=ax.transAxes,
                ha="right" if high_h else "left", va="top" if high_d else "bottom",
                fontsize=10, bbox=dict(boxstyle="round", fc="white", ec="grey", alpha=0.85))


def write_json(numbers: dict[str, Any], path: str | Path) -> None:
    write_atomic(path, json.dumps(numbers, indent=2) + "\n")


def write_export(data: ReportData, tok, path: str | Path) -> None:
    """One row per response, as JSON lines or a Parquet table."""
    rows = export_rows(data, tok)
    path = Path(path)
    if path.suffix == ".jsonl":
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    else:
        buf = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows), buf)
        write_atomic(path, buf.getvalue().to_pybytes())
