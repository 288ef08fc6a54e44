"""The paper's comparison, in miniature: which tokens to distil on, on the addition task.

    python examples/compare.py                 # 27 runs, about 6 minutes on 2 CPU cores
    python examples/compare.py --quick         # 2 rows x 1 seed x 1 iteration, < 1 minute

Each row of the TIP paper's main table (arXiv 2604.14084) -- all tokens, entropy
sampling at 50% and 20%, Soft-OR at 50% and 20%, the Q3 selector at 20% and 10%, the
bottom 50% by Soft-OR -- plus a random 50% control, is run as a separate on-policy
distillation (`tipcli.stages.distill.run_distill`) of the embedded addition task's student
(`tipcli.tasks.arithmetic`) from its teacher, with 3 seeds each. Every row gets the
same prompts per iteration, samples, iterations and optimizer steps (``--max-steps``
is set explicitly; the ``sequence`` selection scope keeps at least one token of every
rollout, so no row loses sequences and every step sees the same number of sequences).

Reported per row:

- student accuracy on held-out prompts after the last iteration (greedy decoding,
  last-number grading), mean and sample standard deviation over seeds; the starting
  student's accuracy is the reference;
- the share of response tokens trained on, from the select manifests' summaries
  (kept tokens / candidate tokens, summed over iterations, mean over seeds);
- peak training memory. Measured from outside the library: for each row and seed,
  iteration 0's selection directory is trained again (same settings, same steps) by
  `tipcli.stages.train.run_train` in a fresh Python process; after torch, transformers and
  accelerate are imported that process records its resident set size (VmRSS), resets
  its high-water mark (writing 5 to /proc/self/clear_refs) and, after training, reads
  VmHWM from /proc/self/status. "peak" is that VmHWM (the whole process, imports
  included), "train +" is VmHWM minus the RSS before training (what loading the
  student, the data and the optimizer and running the steps added).

Outputs (``--results``, default examples/results/): compare.md (the table), compare.json
(every number, per seed and per iteration, plus the settings and the command) and
compare.png (accuracy per row with error bars and the starting student as a line).
Runs live under ``--workdir`` (default /tmp/tip-compare), one directory per row and
seed; a run already complete there is reused, so an interrupted comparison resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import Row, measure_train  # noqa: E402

# the paper's main-table rows, then our random control
ROWS = (Row("all", 1.0), Row("entropy-sample", 0.5), Row("entropy-sample", 0.2),
        Row("soft-or", 0.5), Row("soft-or", 0.2), Row("q3", 0.2), Row("q3", 0.1),
        Row("soft-or-bottom", 0.5), Row("random", 0.5))
QUICK_ROWS = (Row("all", 1.0), Row("soft-or", 0.5))

# what the paper reports for these rows (MATH-500, Qwen3 8B -> 4B); for the notes only
PAPER_MATH500 = {"all @1": 76.7, "entropy-sample @0.5": 78.6, "entropy-sample @0.2": 74.1,
                 "soft-or @0.5": 79.1, "soft-or @0.2": 77.6, "q3 @0.2": 75.7,
                 "q3 @0.1": 76.1, "soft-or-bottom @0.5": 72.3}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="2 rows x 1 seed x 1 iteration on few prompts (a smoke run).")
    p.add_argument("--workdir", default="/tmp/tip-compare", help="Where the runs are written.")
    p.add_argument("--results", default=str(REPO / "examples" / "results"),
                   help="Where compare.md, compare.json and compare.png are written.")
    p.add_argument("--student", default="", help="Starting student (default: the addition "
                   "task's, built and cached on first use).")
    p.add_argument("--teacher", default="", help="Teacher (default: the addition task's).")
    p.add_argument("--prompts", default="", help="Training prompts (default: addition prompts "
                   "that are not among the held-out ones).")
    p.add_argument("--eval-prompts", default="", help="Prompts with an 'answer' field (default: "
                   "the addition task's held-out prompts).")
    p.add_argument("--seeds", type=int, default=None, help="Seeds per row (default 3; quick 1).")
    p.add_argument("--iterations", type=int, default=None, help="On-policy iterations (default "
                   "3; quick 1).")
    p.add_argument("--prompts-per-iteration", type=int, default=None,
                   help="Prompts per iteration (default 64; quick 4).")
    p.add_argument("--num-samples", type=int, default=None, help="Samples per prompt (default 4; "
                   "quick 2).")
    p.add_argument("--max-new-tokens", type=int, default=None, help="Most tokens per response "
                   "(default 40; quick 12).")
    p.add_argument("--batch-size", type=int, default=None, help="Sequences per optimizer step "
                   "(default 16; quick 4).")
    p.add_argument("--max-steps", type=int, default=None, help="Optimizer steps per iteration, "
                   "the same for every row (default prompts x samples / batch).")
    p.add_argument("--lr", type=float, default=5e-5, help="Peak AdamW learning rate (the "
                   "demo's).")
    p.add_argument("--warmup", type=int, default=4, help="Warm-up steps of the run's one "
                   "schedule (the demo's).")
    p.add_argument("--num-eval", type=int, default=None, help="Held-out prompts evaluated "
                   "(default 200; quick 8).")
    p.add_argument("--rows", default="", help="Only these rows, comma-separated slugs such as "
                   "'all-1,soft-or-0.5' (default: every row).")
    p.add_argument("--no-memory", action="store_true", help="Skip the peak-memory runs.")
    args = p.parse_args(argv)
    quick = args.quick
    for name, full, small in (("seeds", 3, 1), ("iterations", 3, 1),
                              ("prompts_per_iteration", 64, 4), ("num_samples", 4, 2),
                              ("max_new_tokens", 40, 12), ("batch_size", 16, 4),
                              ("num_eval", 200, 8)):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    if args.max_steps is None:
        args.max_steps = max(1, args.prompts_per_iteration * args.num_samples // args.batch_size)
    return args


def selected_rows(args: argparse.Namespace) -> tuple[Row, ...]:
    rows = QUICK_ROWS if args.quick else ROWS
    if not args.rows:
        return rows
    wanted = [s.strip() for s in args.rows.split(",") if s.strip()]
    by_slug = {r.slug: r for r in ROWS}
    unknown = [s for s in wanted if s not in by_slug]
    if unknown:
        sys.exit(f"unknown --rows {', '.join(unknown)}; choose from {', '.join(by_slug)}")
    return tuple(by_slug[s] for s in wanted)


# ----------------------------------------------------------------------------- inputs


def prepare_inputs(args: argparse.Namespace, work: Path) -> dict[str, str]:
    """Models and prompt files: the given ones, or the addition task's."""
    from tipcli.stages.demo import SHIPPED_MODELS
    from tipcli.tasks import arithmetic

    student = args.student or str(SHIPPED_MODELS / "student")
    teacher = args.teacher or str(SHIPPED_MODELS / "teacher")
    prompts, eval_prompts = args.prompts, args.eval_prompts
    held = arithmetic.held_out_prompts(args.num_eval)
    if not eval_prompts:
        eval_prompts = str(_write_jsonl(work / "eval-prompts.jsonl", held))
    if not prompts:
        # every held-out test prompt is excluded from training
        test = {r["prompt"] for r in arithmetic.held_out_prompts(arithmetic.NUM_HELD_OUT)}
        pool = [r for r in arithmetic.make_prompts(2000, seed=1) if r["prompt"] not in test]
        prompts = str(_write_jsonl(work / "train-prompts.jsonl", pool))
    return {"student": student, "teacher": teacher, "prompts": prompts,
            "eval_prompts": eval_prompts}


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


# ----------------------------------------------------------------------------- runs


def distill_config(args: argparse.Namespace, inputs: dict[str, str], row: Row, seed: int,
                   out: Path):
    from tipcli.configs import DistillConfig, resolve

    return resolve(
        DistillConfig, student=inputs["student"], teacher=inputs["teacher"],
        prompts=inputs["prompts"], output=str(out), iterations=args.iterations,
        prompts_per_iteration=args.prompts_per_iteration, num_samples=args.num_samples,
        max_new_tokens=args.max_new_tokens, strategy=row.strategy, keep=row.keep,
        lr=args.lr, warmup=args.warmup, max_steps=args.max_steps,
        train_batch_size=args.batch_size,
        eval_prompts=inputs["eval_prompts"], eval_max_prompts=args.num_eval,
        verifier="last-number", seed=seed, device="cpu")


def run_one(args, inputs, row: Row, seed: int, work: Path) -> dict[str, Any]:
    """One distillation run (reused when already complete); its accuracies and shares."""
    from tipcli.stages.distill import run_distill
    from tipcli.store.stagedir import is_complete

    out = work / "runs" / f"{row.slug}-s{seed}"
    reused = is_complete(out)
    t0 = time.perf_counter()
    run_distill(distill_config(args, inputs, row, seed, out))
    seconds = time.perf_counter() - t0
    history = json.loads((out / "manifest.json").read_text())["summary"]["history"]
    iters = [h for h in history if h["iteration"] != "initial"]
    kept = sum(h["selection"]["kept_tokens"] for h in iters)
    total = sum(h["selection"]["candidate_tokens"] for h in iters)
    result = {"seed": seed, "run": str(out), "seconds": round(seconds, 1), "reused": reused,
              "initial_accuracy": history[0]["accuracy"],
              "accuracy": iters[-1]["accuracy"],
              "accuracy_by_iteration": [h["accuracy"] for h in iters],
              "token_share": kept / total, "kept_tokens": kept, "candidate_tokens": total,
              "train_loss_by_iteration": [h["train_loss"] for h in iters]}
    if not args.no_memory:
        result["memory"] = measure_train_memory(args, out, work / "memory" / out.name, seed,
                                                inputs["student"])
    return result


def measure_train_memory(args, run: Path, out: Path, seed: int, student: str) -> dict[str, Any]:
    """Train iteration 0's selection again in a fresh process; its peak resident memory."""
    from tipcli.configs import TrainConfig, resolve, to_flat

    cfg = resolve(TrainConfig, input=str(run / "iter-000" / "select"),
                  output=str(out / "train"), student=student, lr=args.lr,
                  max_steps=args.max_steps, train_batch_size=args.batch_size, seed=seed,
                  device="cpu")
    return measure_train(to_flat(cfg), out)


# ----------------------------------------------------------------------------- summary


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize_row(row: Row, runs: list[dict[str, Any]]) -> dict[str, Any]:
    acc_mean, acc_std = mean_std([r["accuracy"] for r in runs])
    out = {"name": row.name, "strategy": row.strategy, "keep": row.keep,
           "accuracy_mean": acc_mean, "accuracy_std": acc_std,
           "token_share": statistics.fmean(r["token_share"] for r in runs),
           "paper_math500": PAPER_MATH500.get(row.name), "runs": runs}
    if all("memory" in r for r in runs):
        out["peak_mib"] = statistics.fmean(r["memory"]["peak_mib"] for r in runs)
        out["train_mib"] = statistics.fmean(r["memory"]["train_mib"] for r in runs)
        out["train_mib_std"] = mean_std([r["memory"]["train_mib"] for r in runs])[1]
    return out


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        "# TIP comparison on the addition task",
        "",
        f"{s['iterations']} on-policy iterations x {s['prompts_per_iteration']} prompts x "
        f"{s['num_samples']} samples (max {s['max_new_tokens']} new tokens), "
        f"{s['max_steps']} optimizer steps of {s['batch_size']} sequences per iteration, "
        f"one AdamW over the run, lr {s['lr']:g} with {s.get('warmup', 0)} warm-up steps, "
        f"loss rkl-topk; {s['seeds']} seed(s) per row. Accuracy: greedy, "
        f"{s['num_eval']} held-out prompts, after the last iteration (mean ± sample std over "
        "seeds). Tokens: share of response tokens trained on. Memory: peak RSS of a fresh "
        "process retraining iteration 0's selection (whole process / added by training), "
        "MiB, mean over seeds.",
        "",
        "| row | accuracy | Δ vs start | by iteration | tokens trained | peak RSS (MiB) "
        "| train + (MiB) |",
        "|---|---|---|---|---|---|---|",
        f"| starting student | {result['initial_accuracy']:.3f} | – | – | – | – | – |",
    ]
    for r in result["rows"]:
        mem = (f"{r['peak_mib']:.0f} | {r['train_mib']:.1f} ± {r['train_mib_std']:.1f}"
               if "peak_mib" in r else "– | –")
        by_iter = " → ".join(f"{statistics.fmean(a):.2f}" for a in
                             zip(*(x["accuracy_by_iteration"] for x in r["runs"])))
        lines.append(f"| {r['name']} | {r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f} | "
                     f"{r['accuracy_mean'] - result['initial_accuracy']:+.3f} | {by_iter} | "
                     f"{100 * r['token_share']:.1f}% | {mem} |")
    reused = sum(x["reused"] for r in result["rows"] for x in r["runs"])
    note = f" ({reused} complete runs reused from the workdir)" if reused else ""
    lines += ["", f"Wall time: {result['wall_seconds'] / 60:.1f} min{note}. Command:", "",
              f"    {result['command']}", ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [r["name"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 * len(rows) + 2), 4.2))
    # mean ± std per row (points, not bars: the axis does not start at 0), seeds as dots
    ax.errorbar(range(len(rows)), [r["accuracy_mean"] for r in rows],
                yerr=[r["accuracy_std"] for r in rows], fmt="o", capsize=5, color="#4c72b0",
                label="mean ± std over seeds")
    for i, r in enumerate(rows):
        xs = [i + 0.12] * len(r["runs"])
        ax.scatter(xs, [x["accuracy"] for x in r["runs"]], s=9, color="grey", zorder=3)
    ax.axhline(result["initial_accuracy"], color="#c44e52", linestyle="--",
               label=f"starting student ({result['initial_accuracy']:.3f})")
    ax.set_xlim(-0.5, len(rows) - 0.5)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel("held-out accuracy (greedy)")
    s = result["settings"]
    ax.set_title(f"addition task: {s['iterations']} iteration(s), {s['seeds']} seed(s), "
                 "mean ± std", fontsize=10)
    lows = [r["accuracy_mean"] - r["accuracy_std"] for r in rows] + [result["initial_accuracy"]]
    highs = [r["accuracy_mean"] + r["accuracy_std"] for r in rows] + [result["initial_accuracy"]]
    ax.set_ylim(max(0.0, min(lows) - 0.1), min(1.02, max(highs) + 0.08))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    rows = selected_rows(args)
    os.environ.setdefault("TIP_QUIET", "1")
    from tipcli.models.loading import quiet_transformers

    quiet_transformers()
    work, results = Path(args.workdir), Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    inputs = prepare_inputs(args, work)
    summaries = []
    for row in rows:
        runs = []
        for seed in range(args.seeds):
            runs.append(run_one(args, inputs, row, seed, work))
            print(f"{row.name} seed {seed}: accuracy {runs[-1]['accuracy']:.3f}, "
                  f"{runs[-1]['seconds']:.0f} s", file=sys.stderr, flush=True)
        summaries.append(summarize_row(row, runs))
    initial = [r["initial_accuracy"] for s in summaries for r in s["runs"]]
    command = " ".join(shlex.quote(x) for x in
                       ["python", os.path.relpath(__file__, REPO), *argv])
    result = {"command": command, "settings": {**vars(args), **inputs},
              "initial_accuracy": statistics.fmean(initial),
              "memory_method": "peak RSS (VmHWM after resetting it via /proc/self/clear_refs) "
                               "of a fresh process training iteration 0's selection with "
                               "tipcli.stages.train.run_train; train + = VmHWM - VmRSS before "
                               "training",
              "rows": summaries, "wall_seconds": round(time.perf_counter() - start, 1)}
    (results / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (results / "compare.md").write_text(table)
    plot(result, results / "compare.png")
    print(table)
    return result


if __name__ == "__main__":
    main()
