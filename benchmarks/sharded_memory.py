"""Peak memory of each process with models sharded over processes: loading a student under
--fsdp, and scoring with --shard-teacher, on 1 and 2 processes, side by side in one run.

    python benchmarks/sharded_memory.py [--vocab 151936] [--hidden 512] [--layers 8]

Random, vocabulary-heavy models (Llama architecture, untied heads, V = 151,936 by
default) are built offline into a temporary folder and stored in bf16, as published
checkpoints are; every run loads them in float32 (the CPU's default dtype), so a whole
load makes a float32 copy of the whole model (a float32 checkpoint would be mapped from
the file instead, its pages counted as they are touched). Every configuration runs in fresh
processes (torchrun for 2, one thread each, gloo); each process reports its peak resident
memory (VmHWM from /proc/self/status) at the end:

- ``load``: what a process holds to build the student sharded for training: today's
  whole load (``load_model``, then FSDP2 shards it) against the meta-device build that
  reads only the process's own rows from the safetensors (``models.empty_model``,
  ``fsdp.load_shards``);
- ``score``: `tip score` with the teacher whole in one process, and sharded
  (``--shard-teacher``: built on the meta device, each process reading its own rows) over
  1 and 2 processes; the student is small and whole.

Writes a Markdown table to stdout and the numbers to ``--output`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

LOAD = """
import json, sys, torch
from tipcli.dist.mesh import make_mesh
from tipcli.models.loading import empty_model, load_model
from tipcli.dist.processes import processes
from tipcli.dist import fsdp as fsdp2
from tipcli.trainer.module import DistillModule
way, model, out = sys.argv[1:4]
procs = processes("cpu")
mesh, _ = make_mesh(torch.device("cpu"), procs.world)
if way == "whole":
    student, files = load_model(model, "cpu", torch.float32), None
else:
    student, files = empty_model(model)
student.to(torch.float32)  # what training holds, whichever way it was loaded
module = DistillModule(student, "rkl-topk", student.config.vocab_size, 1.0, 8)
fsdp2.shard(module, mesh, bf16=False)
if files is not None:
    fsdp2.load_shards(module, files, "cpu")
held = sum(p.to_local().numel() * 4 for p in module.parameters())
status = open("/proc/self/status").read()
hwm = int(next(l for l in status.splitlines() if l.startswith("VmHWM")).split()[1]) * 1024
with open(f"{out}/load-{procs.rank}.json", "w") as f:
    json.dump({"rank": procs.rank, "vmhwm": hwm, "param_bytes": held}, f)
"""

SCORE = """
import json, sys
from tipcli.cli import main
out = sys.argv[1]
sys.argv = ["tip", *sys.argv[2:]]
try:
    main()
except SystemExit as exc:
    if exc.code:
        raise
import os
rank = int(os.environ.get("RANK", "0"))
status = open("/proc/self/status").read()
hwm = int(next(l for l in status.splitlines() if l.startswith("VmHWM")).split()[1]) * 1024
with open(f"{out}/score-{rank}.json", "w") as f:
    json.dump({"rank": rank, "vmhwm": hwm}, f)
"""


def build(root: Path, vocab: int, hidden: int, layers: int) -> tuple[Path, Path, Path]:
    """A vocabulary-heavy teacher, a small student of the same vocabulary, a rollout."""
    from tipcli.configs import RolloutConfig, resolve
    from tipcli.models.tiny import build_model, build_tokenizer
    from tipcli.stages.rollout import run_rollout

    tok = build_tokenizer(size=vocab)
    paths = []
    for name, h, n in (("teacher", hidden, layers), ("student", 64, 1)):
        d = root / name
        # stored in bf16, as published checkpoints are; loaded in float32 (the CPU's dtype)
        build_model(tok, hidden=h, layers=n, heads=4, seed=len(name)) \
            .to(torch.bfloat16).save_pretrained(d)
        tok.save_pretrained(d)
        paths.append(d)
    prompts = root / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about {i}."}) + "\n"
                               for i in range(8)))
    rollout = run_rollout(resolve(RolloutConfig, student=str(paths[1]), prompts=str(prompts),
                                  output=str(root / "rollout"), max_new_tokens=64,
                                  sample_batch_size=4, shard_size=4))
    return paths[0], paths[1], rollout


def run(script: Path, args: list[str], procs: int, env: dict) -> None:
    head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
            "--master_port", "29813"] if procs > 1 else [sys.executable]
    subprocess.run([*head, str(script), *args], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def collect(out: Path, kind: str) -> list[dict]:
    rows = [json.loads(p.read_text()) for p in sorted(out.glob(f"{kind}-*.json"))]
    for p in out.glob(f"{kind}-*.json"):
        p.unlink()
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--output", default="")
    args = ap.parse_args(argv)
    env = {**os.environ, "TIP_QUIET": "1", "OMP_NUM_THREADS": "1"}
    results: dict = {"settings": vars(args), "load": [], "score": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher, student, rollout = build(root, args.vocab, args.hidden, args.layers)
        (root / "load.py").write_text(LOAD)
        (root / "score.py").write_text(SCORE)
        for way in ("whole", "shards"):
            for procs in (1, 2):
                run(root / "load.py", [way, str(teacher), str(root)], procs, env)
                results["load"].append({"way": way, "processes": procs,
                                        "ranks": collect(root, "load")})
        for shard, procs in ((False, 1), (True, 1), (True, 2)):
            out = root / f"score-{procs}-{shard}"
            tip = ["score", str(rollout), "-t", str(teacher), "-s", str(student), "-o",
                   str(out), "--teacher-top-k", "64", "--score-batch-size", "2"]
            run(root / "score.py", [str(root), *tip, *(["--shard-teacher"] if shard else [])],
                procs, env)
            results["score"].append({"teacher": "sharded" if shard else "whole",
                                     "processes": procs, "ranks": collect(root, "score")})
    mib = 2 ** 20
    lines = ["| what | processes | peak RSS per process (MiB) | parameters held (MiB) |",
             "| --- | ---: | --- | --- |"]
    for r in results["load"]:
        lines.append(f"| load the student, {r['way']} | {r['processes']} | "
                     + ", ".join(f"{x['vmhwm'] / mib:,.0f}" for x in r["ranks"]) + " | "
                     + ", ".join(f"{x['param_bytes'] / mib:,.0f}" for x in r["ranks"]) + " |")
    for r in results["score"]:
        lines.append(f"| tip score, teacher {r['teacher']} | {r['processes']} | "
                     + ", ".join(f"{x['vmhwm'] / mib:,.0f}" for x in r["ranks"]) + " | - |")
    print("\n".join(lines))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
