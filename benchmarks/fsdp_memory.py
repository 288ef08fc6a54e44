"""Parameter and AdamW-state memory per process: one process against FSDP2 over two.

    python benchmarks/fsdp_memory.py                     # CPU, writes benchmarks/results/

For each student (the tiny test student, and a random Llama with ``--hidden``,
``--layers`` and ``--vocab`` rows, tied embeddings off), ``tip train`` runs ``--steps``
steps on a tiny score directory (built here, nothing downloaded; the students share its
character tokenizer, the bigger one's extra vocabulary rows are padding), once in one
process without ``--fsdp`` and once with ``torchrun --nproc_per_node 2 ... --fsdp``
(two CPU processes over gloo). Each run's ``manifest.json`` holds ``numel_per_process``:
the parameter and optimizer-state elements each process held after its last step (the
local shards of DTensors under FSDP; AdamW's exp_avg and exp_avg_sq plus one step counter
per parameter tensor). Memory is those elements x 4 bytes (float32 weights and state);
gradients, freed after each step, are sharded the same way as the parameters. These are
exact counts of what the processes hold, not allocator measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

MIB = 2 ** 20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=32_000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--output", default="")
    return p.parse_args(argv)


def _inputs(root: Path, args) -> tuple[Path, dict[str, Path]]:
    """A score directory of the tiny pair, and the students to train on it."""
    from tipcli.configs import resolve
    from tipcli.models.tiny import build_model, build_tokenizer, save_pair
    from tipcli.stages.rollout import RolloutConfig, run_rollout
    from tipcli.stages.score import ScoreConfig, run_score

    student, teacher = save_pair(root / "models")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{a}+{b}="}) + "\n"
                               for a in range(4) for b in range(2)))
    rollout = run_rollout(resolve(RolloutConfig, student=str(student), prompts=str(prompts),
                                  output=str(root / "rollout"), max_new_tokens=16,
                                  sample_batch_size=4, shard_size=8))
    score = run_score(resolve(ScoreConfig, rollout=str(rollout), teacher=str(teacher),
                              output=str(root / "score"), teacher_top_k=8))
    tok = build_tokenizer()
    big = root / "models" / "big"
    build_model(tok, hidden=args.hidden, layers=args.layers, heads=4,
                vocab_pad=args.vocab - len(tok)).save_pretrained(big)
    tok.save_pretrained(big)
    return score, {"tiny": student,
                   f"llama h{args.hidden} l{args.layers} V{args.vocab}": big}


def _train(score: Path, student: Path, out: Path, steps: int, fsdp: bool) -> dict:
    args = ["train", str(score), "-o", str(out), "--student", str(student), "--strategy",
            "all", "--train-batch-size", "2", "--max-steps", str(steps), "--lr", "1e-4"]
    if fsdp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(_free_port()), "-m", "tipcli", *args, "--fsdp"]
    else:
        cmd = [sys.executable, "-m", "tipcli", *args]
    env = {**os.environ, "TIP_QUIET": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads((out / "manifest.json").read_text())["summary"]["numel_per_process"]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def table(rows: list[dict]) -> str:
    lines = ["| student | run | rank | parameters | AdamW state | MiB (params + state) | "
             "share of one process |", "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['student']} | {r['run']} | {r['rank']} | {r['parameters']:,} | "
                     f"{r['optimizer_state']:,} | {r['mib']:.2f} | {r['share']:.1%} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        score, students = _inputs(root, args)
        for name, path in students.items():
            one = _train(score, path, root / f"{path.name}-one", args.steps, fsdp=False)
            two = _train(score, path, root / f"{path.name}-fsdp", args.steps, fsdp=True)
            whole = one["parameters"][0] + one["optimizer_state"][0]
            for run, held in (("1 process", one), ("FSDP, 2 processes", two)):
                for rank, (p, s) in enumerate(zip(held["parameters"], held["optimizer_state"])):
                    rows.append({"student": name, "run": run, "rank": rank, "parameters": p,
                                 "optimizer_state": s, "mib": (p + s) * 4 / MIB,
                                 "share": (p + s) / whole})
    md = table(rows)
    print(md)
    result = {"setup": vars(args), "machine": {
        "platform": platform.platform(), "python": platform.python_version(),
        "torch": _version("torch"), "transformers": _version("transformers")},
        "method": __doc__.split("\n\n", 2)[2].strip(), "results": rows, "table": md}
    out = Path(args.output or Path(__file__).parent / "results" / "fsdp_memory_cpu.json")
    out.write_text(json.dumps(result, indent=2) + "\n")


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
