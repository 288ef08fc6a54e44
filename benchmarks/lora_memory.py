"""Training memory and time of a LoRA student against every weight trained, side by side.

    python benchmarks/lora_memory.py --select RUN/iter-000/select     # a SmolLM2 selection

Each row trains the same selection (a `tip select` directory, for instance iteration 0 of
`make example-smollm2`: the SmolLM2-135M student without 8 layers) for ``--steps`` steps
of ``--batch`` sequences, in a fresh process (``examples/measure.py``: peak RSS of the
process, "train +" = peak minus the RSS before training, the mean step time from
metrics.jsonl), alternating the rows ``--repeats`` times; the median of each is kept.
Rows: every weight (``--lora-r 0``) and ``--lora-r`` for each rank of ``--ranks``. The
size on disk of what each writes: the whole student, or the adapter.
``--gradient-checkpointing``: every row recomputes the body's activations in backward.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from measure import measure_train  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--select", required=True, help="a tip select directory")
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="every row with --gradient-checkpointing")
    ap.add_argument("--work", default="runs/lora_memory")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" /
                                          "lora_memory_smollm2.json"))
    args = ap.parse_args(argv)
    from tipcli.configs import TrainConfig, resolve
    from tipcli.trainer.data import open_source

    student = open_source(resolve(TrainConfig, input=args.select, output="-")).student
    ranks = [0] + [int(r) for r in args.ranks.split(",") if r]
    runs: dict[int, list[dict]] = {r: [] for r in ranks}
    for rep in range(args.repeats):
        for r in ranks:
            settings = {"input": args.select, "output": "-", "student": student,
                        "max_steps": args.steps,
                        "train_batch_size": args.batch, "lr": 1e-4, "lora_r": r,
                        "device": "cpu", "save_state": False,
                        "gradient_checkpointing": args.gradient_checkpointing}
            out = Path(args.work) / f"r{r}-{rep}"
            runs[r].append(measure_train(settings, out, args.threads))
            print(f"lora-r {r} repeat {rep}: {runs[r][-1]}", file=sys.stderr, flush=True)
    rows = {}
    for r in ranks:
        rows[f"lora-r {r}" if r else "every weight"] = {
            k: statistics.median(m[k] for m in runs[r])
            for k in ("peak_mib", "train_mib", "step_seconds", "weights_bytes")}
    full = rows["every weight"]
    for row in rows.values():
        row["train_vs_full"] = row["train_mib"] / full["train_mib"]
        row["step_vs_full"] = row["step_seconds"] / full["step_seconds"]
    result = {"select": args.select, "settings": vars(args), "rows": rows, "runs": runs}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print("| run | peak RSS (MiB) | train + (MiB) | train + vs every weight | step (s) | "
          "step vs every weight | written (MB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['peak_mib']:,.0f} | {row['train_mib']:,.0f} | "
              f"{row['train_vs_full']:.2f} | {row['step_seconds']:.2f} | "
              f"{row['step_vs_full']:.2f} | {row['weights_bytes'] / 1e6:,.1f} |")


if __name__ == "__main__":
    main()
