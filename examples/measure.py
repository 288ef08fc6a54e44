"""Peak memory and step time of `tip train` alone, measured in a fresh process; the row
type of the examples' comparisons.

Used by the examples' comparisons. The child process imports torch, transformers and
accelerate, loads the student once and drops it (so the lazily imported model code counts
as the baseline, not as training), records its resident set size (VmRSS), resets its
high-water mark (5 into /proc/self/clear_refs), runs ``tipcli.stages.train.run_train`` and reads
VmHWM from /proc/self/status. "peak" is VmHWM (the whole process, imports included),
"train +" is VmHWM minus the RSS before training: what loading the student, the data and
the optimizer and running the steps added. The step time is the mean over the run's
steps of tokens / tokens_per_s from its metrics.jsonl (model loading excluded).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Row:
    """One row of a comparison: a selection strategy at a kept share."""

    strategy: str
    keep: float

    @property
    def name(self) -> str:
        return f"{self.strategy} @{self.keep:g}"

    @property
    def slug(self) -> str:
        return f"{self.strategy}-{self.keep:g}"

CHILD = r"""
import gc, json, sys, time
import accelerate, torch, transformers  # noqa: F401  imported before the baseline
from tipcli.configs import TrainConfig, resolve
from tipcli.models.loading import load_model
from tipcli.stages.train import run_train

def status_mib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024

torch.set_num_threads(int(sys.argv[2]))
cfg = resolve(TrainConfig, **json.loads(sys.argv[1]))
load_model(cfg.student, "cpu", torch.float32)  # warm-up, dropped at once
gc.collect()
before = status_mib("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    reset = True
except OSError:
    reset = False
t0 = time.perf_counter()
run_train(cfg, overwrite=True)
print(json.dumps({"rss_before_mib": before, "peak_mib": status_mib("VmHWM"),
                  "hwm_reset": reset, "train_seconds": time.perf_counter() - t0}))
"""


def measure_train(settings: dict[str, Any], out: Path, threads: int | None = None
                  ) -> dict[str, Any]:
    """Train with ``settings`` (a flat TrainConfig; its output is replaced by ``out/train``)
    in a fresh process; cached in ``out/memory.json``. The trained weights are deleted."""
    cached = out / "memory.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    import torch

    settings = {**settings, "output": str(out / "train")}
    env = {**os.environ, "TIP_QUIET": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(settings),
                           str(threads or torch.get_num_threads())], capture_output=True,
                          text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"memory run into {out} failed:\n{proc.stderr[-3000:]}")
    mem = json.loads(proc.stdout.strip().splitlines()[-1])
    mem["train_mib"] = mem["peak_mib"] - mem["rss_before_mib"]
    steps = [json.loads(ln) for ln in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    mem["steps"] = len(steps)
    mem["step_seconds"] = statistics.fmean(s["tokens"] / s["tokens_per_s"] for s in steps)
    # what the trained student takes on disk: its weights, or a LoRA run's adapter
    mem["weights_bytes"] = sum(p.stat().st_size for p in (out / "train").glob("*.safetensors"))
    out.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(mem, indent=2) + "\n")
    shutil.rmtree(out / "train", ignore_errors=True)  # the weights are not needed
    return mem
