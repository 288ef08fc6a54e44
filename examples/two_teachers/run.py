"""Two specialist teachers, one student: addition from the demo's teacher, subtraction from
a teacher of its own, each prompt routed by its ``teacher`` field.

    python examples/two_teachers/run.py            # 3 runs of 3 iterations, ~2 minutes
    python examples/two_teachers/run.py --quick    # 1 iteration of 8 prompts each

The models are shipped beside this script (``models/``, built by
``tipcli.tasks.build.build_two_tasks``; its ``build.json`` records how): ``student-both``,
a 2-layer student trained to a weak start on both tasks, and ``teacher-sub``, a 4-layer
subtraction teacher; the addition teacher is the demo's (``tipcli/demo_models/teacher``).
Three `tip distill` runs from the same student, with the demo's settings (3 iterations of
64 prompts x 4 samples, soft-or at 0.5, one AdamW over the loop at lr 5e-5):

- ``both``: ``--teacher add=ADD --teacher sub=SUB`` over prompts of both tasks (each
  prompt's ``teacher`` field routes it);
- ``add alone``: the addition teacher on addition prompts only;
- ``sub alone``: the subtraction teacher on subtraction prompts only.

Each final student (and the starting one) is graded greedily on 100 held-out prompts of
each task (``tip eval``, last-number). Results: ``--json`` (default
examples/results/two_teachers.json) and the table printed. Runs live under ``--workdir``
(default /tmp/tip-two-teachers); complete ones found there are reused.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MODELS = HERE / "models"
SETTINGS = dict(iterations=3, prompts_per_iteration=64, num_samples=4, max_new_tokens=40,
                lr=5e-5, warmup=4, train_batch_size=16, strategy="soft-or", keep=0.5,
                teacher_top_k=16, group_size=64, seed=0)
QUICK = dict(SETTINGS, iterations=1, prompts_per_iteration=8, num_samples=2,
             train_batch_size=4)
TASKS = {"add": "+", "sub": "-"}
NUM_EVAL = 100


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 iteration of 8 prompts per run")
    p.add_argument("--workdir", default="/tmp/tip-two-teachers")
    p.add_argument("--json", default=str(REPO / "examples" / "results" / "two_teachers.json"))
    return p.parse_args(argv)


def prompts(work: Path) -> dict[str, Path]:
    """Training prompts of each task and of both (shuffled), and held-out prompts of each
    task; every record names its teacher."""
    from tipcli.tasks.arithmetic import NUM_HELD_OUT, held_out_prompts, make_prompts
    from tipcli.tasks.arithmetic import write_records as write

    out, train = {}, {}
    for name, op in TASKS.items():
        test = {r["prompt"] for r in held_out_prompts(NUM_HELD_OUT, op)}
        train[name] = [{**r, "teacher": name} for r in make_prompts(600, seed=1, op=op)
                       if r["prompt"] not in test][:512]
        out[f"train-{name}"] = write(work / f"train-{name}.jsonl", train[name])
        out[f"eval-{name}"] = write(work / f"eval-{name}.jsonl",
                                    [{**r, "teacher": name} for r in held_out_prompts(NUM_EVAL,
                                                                                      op)])
    both = train["add"] + train["sub"]
    random.Random(0).shuffle(both)
    out["train-both"] = write(work / "train-both.jsonl", both)
    return out


def distill(work: Path, name: str, teachers: list[str], train: Path, settings: dict) -> Path:
    from tipcli.configs import DistillConfig, resolve
    from tipcli.stages.distill import run_distill

    out = work / name
    run_distill(resolve(DistillConfig, student=str(MODELS / "student-both"),
                        teacher=teachers if len(teachers) > 1 else teachers[0],
                        prompts=str(train), output=str(out), **settings))
    manifest = json.loads((out / "manifest.json").read_text())
    return Path(manifest["summary"]["final_student"])


def accuracy(model: Path, test: Path, out: Path) -> dict[str, Any]:
    from tipcli.configs import EvalConfig, resolve
    from tipcli.stages.evaluate import run_eval

    res = run_eval(resolve(EvalConfig, model=str(model), prompts=str(test), output=str(out),
                           max_new_tokens=48),
                   show_progress=False)
    return {"accuracy": res.accuracy, "interval_95": list(res.interval), "n": res.n}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    settings = QUICK if args.quick else SETTINGS
    work = Path(args.workdir) / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    files = prompts(work)
    add_t = str(REPO / "tipcli" / "demo_models" / "teacher")
    sub_t = str(MODELS / "teacher-sub")
    runs = {"both": ([f"add={add_t}", f"sub={sub_t}"], files["train-both"]),
            "add alone": ([add_t], files["train-add"]),
            "sub alone": ([sub_t], files["train-sub"])}
    start = time.perf_counter()
    result: dict[str, Any] = {"settings": settings, "students": {}}
    students = {"start": MODELS / "student-both"}
    for name, (teachers, train) in runs.items():
        students[name] = distill(work, name.replace(" ", "-"), teachers, train, settings)
    for name, model in students.items():
        result["students"][name] = {
            task: accuracy(model, files[f"eval-{task}"],
                           work / "eval" / f"{name.replace(' ', '-')}-{task}")
            for task in TASKS}
    result["seconds"] = round(time.perf_counter() - start, 1)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return result


def table(result: dict[str, Any]) -> str:
    rows = ["| student | addition accuracy (95% CI) | subtraction accuracy (95% CI) |",
            "| --- | ---: | ---: |"]
    for name, acc in result["students"].items():
        cells = [f"{a['accuracy']:.3f} ({a['interval_95'][0]:.3f}-{a['interval_95'][1]:.3f})"
                 for a in (acc["add"], acc["sub"])]
        rows.append(f"| {name} | {cells[0]} | {cells[1]} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
