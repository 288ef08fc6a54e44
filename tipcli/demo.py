"""`tip demo`: on-policy distillation of the embedded addition task, end to end.

    tip demo -o runs/demo

Builds (once, cached) a teacher that adds 2-3 digit numbers with a worked scratchpad
and a weaker student, then runs `tip distill` with Soft-OR at keep 0.5, prints the
token-importance report of the last iteration and the student's held-out accuracy
before and after. A second run with the same -o reuses the finished stages.
"""

from __future__ import annotations

import json
from pathlib import Path

from tipcli.configs import DemoConfig, DistillConfig, ReportConfig, resolve
from tipcli.distill import run_distill
from tipcli.files import write_atomic
from tipcli.progress import Timer, console
from tipcli.report import run_report
from tipcli.tasks.arithmetic import build_models, held_out_prompts, write_prompts

# The settings the demo runs with; `tip distill --help` documents each one.
DEMO_SETTINGS = dict(iterations=3, prompts_per_iteration=64, num_samples=4, max_new_tokens=40,
                     lr=1e-4, batch_size=16, strategy="soft-or", keep=0.5, top_k=16,
                     group_size=64, seed=0)
TRAIN_PROMPTS, EVAL_PROMPTS = 512, 200


def run_demo(cfg: DemoConfig, models: tuple[str | Path, str | Path] | None = None) -> Path:
    """Run the demo into ``cfg.output``; ``cfg.quick`` shrinks it to seconds. ``models``
    gives a (student, teacher) pair to use instead of the embedded task's cached pair."""
    out, quick = Path(cfg.output), cfg.quick
    out.mkdir(parents=True, exist_ok=True)
    with Timer() as build:
        student, teacher = models or build_models()
    console.print(f"models: student {student}, teacher {teacher} ({build.seconds:.0f} s)")
    train = write_prompts(out / "train.jsonl", TRAIN_PROMPTS, seed=1)
    heldout = out / "heldout.jsonl"
    n_eval = 20 if quick else EVAL_PROMPTS
    write_atomic(heldout, "".join(json.dumps(r) + "\n" for r in held_out_prompts(n_eval)))
    settings = dict(DEMO_SETTINGS)
    if quick:
        settings.update(iterations=1, prompts_per_iteration=8, num_samples=2, max_steps=2)
    with Timer() as run:
        path = run_distill(resolve(DistillConfig, student=str(student), teacher=str(teacher),
                                   prompts=str(train), eval_prompts=str(heldout),
                                   output=str(out / "distill"), **settings))
    _summarise(path, settings["iterations"], run.seconds)
    return path


def _summarise(run: Path, iterations: int, seconds: float) -> None:
    last = run / f"iter-{iterations - 1:03d}" / "select"
    console.rule(f"token importance in the last iteration ({last})")
    run_report(resolve(ReportConfig, path=str(last)))
    history = json.loads((run / "manifest.json").read_text())["summary"]["history"]
    first, final = history[0], history[-1]
    console.rule("student accuracy on held-out prompts (greedy)")
    for label, h in (("before", first), ("after", final)):
        lo, hi = h["interval_95"]
        console.print(f"{label:>6}: {h['accuracy']:.3f}  (95% CI {lo:.3f}-{hi:.3f})")
    console.print(f"distill time: {seconds:.0f} s")
