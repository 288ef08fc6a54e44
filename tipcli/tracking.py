"""Metrics to the experiment trackers ML engineers watch: TensorBoard, W&B, trackio.

    tip train runs/score -o runs/train --report-to tensorboard
    tensorboard --logdir runs/train/logs

Built on accelerate's tracker classes (``accelerate.tracking``); only the main process
logs (callers make a ``Tracker("none", ...)`` elsewhere). Files go under ``OUTPUT/logs/``:
TensorBoard's event files, W&B's run directory (``WANDB_MODE=offline`` logs without an
account); trackio keeps its own local store. Nested metrics
flatten to ``loss_by_quadrant/Q1``. The tracker packages are optional extras:
``pip install 'tipcli[tensorboard]'`` (or ``[wandb]``, ``[trackio]``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from tipcli.errors import TipError, first_line

LOGS = "logs"
PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",),
            "trackio": ("trackio",)}


def check_available(kind: str) -> None:
    """A one-line error naming the extra to install when ``kind``'s package is missing."""
    if kind == "none":
        return
    if not any(importlib.util.find_spec(p) for p in PACKAGES[kind]):
        raise TipError(f"--report-to {kind} needs the {PACKAGES[kind][0]} package: "
                       f"pip install 'tipcli[{kind}]'")


def flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, float | int]:
    """``{"loss_by_quadrant": {"Q1": 0.5}}`` -> ``{"loss_by_quadrant/Q1": 0.5}``; numbers only."""
    out: dict[str, float | int] = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
            out[key] = v
    return out


class Tracker:
    """One run of one tracker kind (or nothing, for ``none``): ``log`` and ``close``."""

    def __init__(self, kind: str, output: str | Path, run_name: str,
                 config: dict[str, Any] | None = None):
        self.kind, self.tracker = kind, None
        if kind == "none":
            return
        check_available(kind)
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        logs = Path(output) / LOGS
        cls = LOGGER_TYPE_TO_CLASS[kind]
        try:
            if kind == "tensorboard":
                tracker = cls(run_name, str(logs))
            elif kind == "wandb":
                logs.mkdir(parents=True, exist_ok=True)
                tracker = cls(run_name, dir=str(logs))
            else:
                tracker = cls(run_name)
            tracker.start()
            if config:
                tracker.store_init_configuration(
                    {k: v for k, v in config.items() if isinstance(v, (str, int, float, bool))})
        except Exception as exc:  # a tracker that cannot start (login, network, disk)
            raise TipError(f"--report-to {kind} could not start: {first_line(exc)}") from None
        self.tracker = tracker
        self.logs = logs

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.tracker is not None:
            self.tracker.log(flatten(metrics), step=step)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.finish()
            self.tracker = None

