"""`tip report`: what the token-importance signals look like in a score or selection dir.

    tip report runs/select --json report.json --png report.png --export tokens.parquet --show 3

Tables on stderr: tokens per quadrant with mean entropy, divergence and teacher
log-prob; a heat table of the (h, d) histogram; for every strategy at keep 0.1/0.2/0.5
the share of total divergence mass it keeps, the share of Q3 tokens it keeps and its
overlap with entropy-only; the quadrants over position-in-response fifths. A selection
directory is reported with its own settings and mask; a score directory with the
selection flags given (``tip select``'s defaults) and every token selected. The numbers
are computed in ``compute`` from one read of the directory, drawn in ``render``. Stdout
gets only the input directory (last line), like every other stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tipcli.configs import ReportConfig, validate
from tipcli.models.loading import load_tokenizer
from tipcli.stages.report.compute import ReportData, compute_report, load_report_data
from tipcli.stages.report.render import (
    render_tables,
    show_responses,
    write_export,
    write_json,
    write_png,
)
from tipcli.store.outputs import check_output_file

__all__ = ["ReportData", "compute_report", "load_report_data", "run_report"]


def run_report(cfg: ReportConfig) -> dict[str, Any]:
    """Compute, render on stderr and write the requested files; returns the numbers."""
    validate(cfg)
    for flag, target in (("--json", cfg.json), ("--png", cfg.png), ("--export", cfg.export)):
        if target:
            check_output_file(target, flag, (cfg.path,))
    data = load_report_data(cfg, prompts=bool(cfg.export))
    for flag, target in (("--json", cfg.json), ("--png", cfg.png), ("--export", cfg.export)):
        if target:  # not into the score directory a selection was made from, either
            check_output_file(target, flag, (data.score.path,))
    numbers = compute_report(data)
    render_tables(numbers)
    if cfg.json:
        write_json(numbers, cfg.json)
    if cfg.png:
        write_png(numbers, cfg.png)
    if cfg.export or cfg.show:
        tok = load_tokenizer(data.score.setting("student"),
                             data.score.setting("trust_remote_code"))
        if cfg.export:
            write_export(data, tok, cfg.export)
        if cfg.show:
            show_responses(data, tok, cfg.show)
    return numbers


def run_report_cli(cfg: ReportConfig) -> Path:
    """``run_report`` for the command line: the input directory is what it prints."""
    run_report(cfg)
    return Path(cfg.path)
