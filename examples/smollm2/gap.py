"""When selection pays: the comparison at three student-teacher distances.

    python examples/smollm2/gap.py run [--workers 2] [--work runs/smollm2-gap] [--only JOB,...]
    python examples/smollm2/gap.py collect [--work runs/smollm2-gap]

Students without 2, 4 and 8 of the teacher's 30 decoder layers (least harmful first, as
``run.py`` builds them). At each distance: all tokens, soft-or @0.5 and random @0.5, seeds
0-2, at the larger steps (32 prompts x 2 samples per iteration, 4 steps of 16 sequences);
then, if time allows, soft-or @0.2 and entropy-sample @0.2 at the closest distance. The
8-layer rows that ``results/large-steps.json`` already holds (all tokens, soft-or @0.5)
are reused, not run again.

``run`` builds the students, then works through the jobs ``--workers`` at a time, each
one ``run.py`` invocation (one row, one seed) with one torch thread, seed 0 of every
row first; a finished run is skipped, an interrupted one resumed; ``--only`` runs the named
jobs (``minus2-all-1-s0,...``) in the order given. Each finished job's record (run.py's
figures plus its iteration-0 matched share) is copied to ``results/gap-runs/NAME.json``,
which is committed: the study survives the loss of its work directory. ``collect`` reads
those records and writes ``results/gap.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
DISTANCES = (2, 4, 8)
ROWS = ("all-1", "soft-or-0.5", "random-0.5")
EXTRA_ROWS = ("soft-or-0.2", "entropy-sample-0.2")  # at the closest distance, if time allows
SEEDS = (0, 1, 2)
REUSED = {(8, "all-1"), (8, "soft-or-0.5")}  # in results/large-steps.json
LARGE_STEPS = ["--prompts-per-iteration", "32", "--train-batch-size", "16", "--no-memory"]


def jobs() -> list[tuple[int, str, int]]:
    """(removed layers, row, seed), seed by seed, the optional rows last."""
    main = [(d, row, s) for s in SEEDS for d in DISTANCES for row in ROWS
            if (d, row) not in REUSED]
    extra = [(min(DISTANCES), row, s) for s in SEEDS for row in EXTRA_ROWS]
    return main + extra


def job_name(removed: int, row: str, seed: int) -> str:
    return f"minus{removed}-{row}-s{seed}"


def run_job(work: Path, results: Path, removed: int, row: str,
            seed: int) -> tuple[str, int, float]:
    name = job_name(removed, row, seed)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(HERE / "run.py"), "--removed", str(removed), "--rows", row,
           "--seeds", str(seed), "--work", str(work / f"minus{removed}"),
           "--results", str(work / "jobs"), "--name", name, *LARGE_STEPS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    with open(logs / f"{name}.log", "a") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    seconds = time.perf_counter() - t0
    if code == 0:
        keep_record(work, results, removed, row, seed)
    print(f"{name}: exit {code}, {seconds:.0f} s", file=sys.stderr, flush=True)
    return name, code, seconds


def keep_record(work: Path, results: Path, removed: int, row: str, seed: int) -> Path:
    """run.py's record of a finished job, with its matched share, into results/gap-runs."""
    name = job_name(removed, row, seed)
    record = json.loads((work / "jobs" / f"{name}.json").read_text())
    record["matched"] = matched_share(work, removed, seed)
    out = results / "gap-runs" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    return out


def build_students() -> None:
    """Every distance's student, one after the other (workers then only load them)."""
    sys.path.insert(0, str(HERE))
    from run import build_student, teacher_gguf

    teacher = teacher_gguf()
    for removed in DISTANCES:
        print(f"student minus {removed}: {build_student(teacher, removed)}", file=sys.stderr)


def run(args) -> None:
    build_students()
    work = Path(args.work)
    todo = jobs()
    if args.only:
        named = {job_name(*j): j for j in todo}
        unknown = [n for n in args.only.split(",") if n not in named]
        if unknown:
            raise SystemExit(f"unknown jobs: {', '.join(unknown)} (known: {', '.join(named)})")
        todo = [named[n] for n in args.only.split(",")]
    print(f"{len(todo)} jobs, {args.workers} at a time", file=sys.stderr, flush=True)
    with ThreadPoolExecutor(args.workers) as pool:
        done = list(pool.map(lambda j: run_job(work, Path(args.results), *j), todo))
    failed = [name for name, code, _ in done if code]
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)} (logs under {work / 'logs'})")


# ----------------------------------------------------------------------------- collect

LABELS = {"all-1": "all tokens", "soft-or-0.5": "soft-or @0.5", "random-0.5": "random @0.5",
          "soft-or-0.2": "soft-or @0.2", "entropy-sample-0.2": "entropy-sample @0.2"}
MATCHED = (0.05, 0.2)  # nats: a token whose reverse KL is below this counts as matched


def row_slug(row: dict) -> str:
    return f"{row['strategy']}-{row['keep']:g}"


def finished_runs(results: Path) -> tuple[dict[tuple[int, str, int], dict],
                                          dict[tuple[int, int], dict[str, float]]]:
    """(removed, row, seed) -> one finished run's figures (the committed job records, then
    the reused rows); (removed, seed) -> iteration 0's matched share."""
    runs: dict[tuple[int, str, int], dict] = {}
    matched: dict[tuple[int, int], dict[str, float]] = {}
    for removed, row, seed in jobs():
        path = results / "gap-runs" / f"{job_name(removed, row, seed)}.json"
        if path.is_file():
            record = json.loads(path.read_text())
            for r in record["rows"][0]["runs"]:
                runs[removed, row, r["seed"]] = r
            if record.get("matched"):
                matched[removed, seed] = record["matched"]
    reused = json.loads((results / "large-steps.json").read_text())
    removed = len(reused["removed_layers"])
    for row in reused["rows"]:
        for r in row["runs"]:
            if (removed, row_slug(row)) in REUSED:
                runs[removed, row_slug(row), r["seed"]] = r
    return runs, matched


def matched_share(work: Path, removed: int, seed: int) -> dict[str, float] | None:
    """Share of iteration 0's response tokens whose reverse KL is below each MATCHED bound.

    Iteration 0's rollout and scores depend on the student and the seed only, not on the
    row, so any row's run at this distance and seed serves."""
    from tipcli.store.stagedir import StageDir, is_complete

    for row in ROWS + EXTRA_ROWS:
        score = work / f"minus{removed}" / "runs" / f"{row}-s{seed}" / "iter-000" / "score"
        if is_complete(score):
            rkl = [seq["rkl"] for seq in StageDir.open(score).iter_sequences()]
            if not rkl:
                continue
            import torch

            values = torch.cat(rkl)
            return {f"{bound:g}": (values < bound).float().mean().item() for bound in MATCHED}
    return None


def collect(args) -> None:
    results = Path(args.results)
    runs, matched = finished_runs(results)
    distances = []
    for removed in DISTANCES:
        seeds = sorted({s for (d, _, s) in runs if d == removed})
        starts = [r["rkl_before"] for (d, row, _), r in runs.items()
                  if d == removed and row == "all-1"] or \
                 [r["rkl_before"] for (d, _, _), r in runs.items() if d == removed]
        start = statistics.fmean(starts) if starts else None
        shares = [matched[removed, s] for s in SEEDS if (removed, s) in matched]
        entry = {"removed": removed, "seeds": seeds, "start_rkl": start,
                 "matched": {f"{b:g}": statistics.fmean(m[f"{b:g}"] for m in shares)
                             for b in MATCHED} if shares else None,
                 "rows": {}}
        for row in ROWS + EXTRA_ROWS:
            have = {s: runs[removed, row, s] for s in seeds if (removed, row, s) in runs}
            if not have:
                continue
            out = {"name": LABELS[row], "seeds": sorted(have)}
            for key in ("rkl_after", "fkl_after"):
                out[key] = mean_std([r[key] for r in have.values()])
                if row != "all-1":
                    # paired by seed: the same iteration-0 rollout, the same held-out prompts
                    paired = [r[key] - runs[removed, "all-1", s][key] for s, r in have.items()
                              if (removed, "all-1", s) in runs]
                    out[key.replace("after", "vs_all")] = mean_std(paired) if paired else None
                    out[key.replace("after", "vs_all_per_seed")] = paired
            entry["rows"][row] = out
        distances.append(entry)
    result = {"settings": LARGE_STEPS, "matched_bounds": list(MATCHED),
              "distances": distances}
    (results / "gap.json").write_text(json.dumps(result, indent=2) + "\n")
    (results / "gap.md").write_text(gap_markdown(result))
    gap_plot(result, results / "gap.png")
    print((results / "gap.md").read_text())


def mean_std(values: list[float]) -> list[float]:
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def gap_markdown(result: dict) -> str:
    lines = ["Held-out reverse / forward KL after 8 iterations (nats/token, mean +- std over the "
             "seeds listed); `vs all` is the row minus all tokens, paired by seed (negative: "
             "the row ends closer to the teacher). `matched`: share of iteration 0's response "
             "tokens whose reverse KL is below 0.05 / 0.2 nats.", "",
             "| student | start rKL | matched <0.05 / <0.2 | row | seeds | rKL after | "
             "rKL vs all | fKL after | fKL vs all |", "|---|---|---|---|---|---|---|---|---|"]

    def pm(v):
        return "-" if v is None else f"{v[0]:+.3f} +- {v[1]:.3f}"

    for d in result["distances"]:
        start = "-" if d["start_rkl"] is None else f"{d['start_rkl']:.3f}"
        matched = ("-" if d["matched"] is None else
                   " / ".join(f"{100 * v:.1f}%" for v in d["matched"].values()))
        if not d["rows"]:
            lines.append(f"| minus {d['removed']} layers | {start} | {matched} | no finished "
                         "run yet | | | | | |")
        for i, r in enumerate(d["rows"].values()):
            head = (f"minus {d['removed']} layers | {start} | {matched}" if i == 0 else " | | ")
            lines.append(
                f"| {head} | {r['name']} | {len(r['seeds'])} | {r['rkl_after'][0]:.3f} +- "
                f"{r['rkl_after'][1]:.3f} | {pm(r.get('rkl_vs_all'))} | {r['fkl_after'][0]:.3f} "
                f"+- {r['fkl_after'][1]:.3f} | {pm(r.get('fkl_vs_all'))} |")
    return "\n".join(lines) + "\n"


def gap_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharex=True)
    for ax, key, title in zip(axes, ("rkl_vs_all", "fkl_vs_all"),
                              ("held-out reverse KL", "held-out forward KL")):
        for slug in ROWS[1:] + EXTRA_ROWS:
            pts = [(d["start_rkl"], d["rows"][slug][key]) for d in result["distances"]
                   if d["start_rkl"] is not None and slug in d["rows"]
                   and d["rows"][slug].get(key)]
            if pts:
                xs = [x for x, _ in pts]
                line = ax.errorbar(xs, [v[0] for _, v in pts], yerr=[v[1] for _, v in pts],
                                   marker="o", capsize=3, label=LABELS[slug],
                                   ls="--" if slug.startswith("random") else "-")
                seeds = [(d["start_rkl"], y) for d in result["distances"]
                         if d["start_rkl"] is not None and slug in d["rows"]
                         for y in d["rows"][slug].get(key.replace("vs_all",
                                                                  "vs_all_per_seed"), [])]
                ax.scatter([x for x, _ in seeds], [y for _, y in seeds], s=14, alpha=0.6,
                           color=line[0].get_color(), marker="x")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(xlabel="student's held-out reverse KL before training (nats/token)",
               ylabel="row minus all tokens, after 8 iterations (x: each seed)", title=title)
        ax.legend(fontsize=8)
    fig.suptitle("When selection pays: SmolLM2-135M students 2 / 4 / 8 layers short")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=("run", "collect"))
    ap.add_argument("--work", default="runs/smollm2-gap")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", default="", help="run: these jobs only, in this order")
    ap.add_argument("--results", default=str(HERE / "results"),
                    help="where gap-runs/ (the job records) and gap.{json,md,png} go")
    args = ap.parse_args(argv)
    if args.command == "run":
        run(args)
    else:
        collect(args)


if __name__ == "__main__":
    main()
