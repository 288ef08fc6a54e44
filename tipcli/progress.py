"""rich progress bars and console output on stderr (stdout carries only the output path)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

console = Console(stderr=True)


class RateColumn(ProgressColumn):
    """Tokens per second, from a ``tokens`` field the task updates."""

    def render(self, task) -> Text:
        tokens = task.fields.get("tokens", 0)
        elapsed = task.elapsed or 0.0
        rate = tokens / elapsed if elapsed > 0 else 0.0
        return Text(f"{rate:,.0f} tok/s", style="cyan")


class LoggedProgress(Progress):
    """rich's progress bars; where stderr is no terminal (a CI log, ``2> file``), where
    rich draws nothing until the end, a plain line per task every 10% or 30 s instead
    (and no bar)."""

    EVERY_SECONDS = 30.0

    def __init__(self, *args, console: Console | None = None, disable: bool = False, **kwargs):
        from rich import get_console

        shown = console or get_console()
        plain = not shown.is_terminal and not disable
        super().__init__(*args, console=shown, disable=disable or plain, **kwargs)
        self.plain = plain
        self._logged: dict[int, tuple[float, int]] = {}  # task: (time, tenths) last logged

    def update(self, task_id, **kwargs) -> None:
        super().update(task_id, **kwargs)
        if self.plain:
            self._log(task_id)

    def _log(self, task_id) -> None:
        task = self._tasks[task_id]
        if not task.total:
            return
        now, tenths = time.monotonic(), int(10 * task.completed / task.total)
        last_time, last_tenths = self._logged.get(task_id, (task.start_time or now, 0))
        if tenths <= last_tenths and now - last_time < self.EVERY_SECONDS:
            return
        self._logged[task_id] = (now, tenths)
        elapsed = task.elapsed or 0.0
        tokens = task.fields.get("tokens", 0)
        rate = f", {tokens / elapsed:,.0f} tok/s" if tokens and elapsed else ""
        self.console.print(f"{task.description}: {task.completed:,.0f}/{task.total:,.0f} "
                           f"({task.completed / task.total:.0%}){rate}, {elapsed:.0f} s",
                           markup=False, highlight=False)


def progress() -> Progress:
    """A progress bar on stderr (plain lines where stderr is no terminal); silent when
    TIP_QUIET is set."""
    return LoggedProgress(TextColumn("[bold]{task.description}"), BarColumn(),
                          MofNCompleteColumn(), RateColumn(), TimeElapsedColumn(),
                          TimeRemainingColumn(), console=console,
                          disable=bool(os.environ.get("TIP_QUIET")), transient=False)


Advance = Callable[..., None]


@contextmanager
def progress_task(label: str | None, total: float, show: bool = True,
                  completed: float = 0) -> Iterator[Advance]:
    """One task's progress bar on stderr; yields ``advance(n=1, tokens=0, description=None,
    total=None)``: ``n`` more done, ``tokens`` more generated or scored (the tok/s column),
    a new description or total. Without a ``label``, or with ``show`` false (every process
    but the main one), nothing is drawn and ``advance`` does nothing."""
    if label is None or not show:
        yield lambda *a, **kw: None
        return
    with progress() as bar:
        task = bar.add_task(label, total=total, completed=completed, tokens=0)

        def advance(n: float = 1, tokens: int = 0, description: str | None = None,
                    total: float | None = None) -> None:
            fields = bar.tasks[task].fields
            bar.update(task, advance=n, tokens=fields["tokens"] + tokens, total=total,
                       description=description)

        yield advance


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
