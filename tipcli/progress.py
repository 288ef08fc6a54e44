"""rich progress bars and console output on stderr (stdout carries only the output path)."""

from __future__ import annotations

import os
import sys
import time

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

console = Console(stderr=True)


class RateColumn(ProgressColumn):
    """Tokens per second, from a ``tokens`` field the task updates."""

    def render(self, task) -> Text:
        tokens = task.fields.get("tokens", 0)
        elapsed = task.elapsed or 0.0
        rate = tokens / elapsed if elapsed > 0 else 0.0
        return Text(f"{rate:,.0f} tok/s", style="cyan")


def progress() -> Progress:
    """A progress bar on stderr; silent when TIP_QUIET is set or stderr is not a terminal
    in CI logs (rich then prints only the final state)."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    RateColumn(), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                    disable=bool(os.environ.get("TIP_QUIET")), transient=False)


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def emit_path(path) -> None:
    """The last line of stdout: the stage's output directory, for pipes."""
    sys.stdout.write(f"{path}\n")
    sys.stdout.flush()
