"""`tip demo`: rollout -> score on a built-in tiny model pair, with a summary table.

    tip demo -o runs/demo
"""

from __future__ import annotations

import json
from pathlib import Path

DEMO_PROMPTS = ["What is 12+35?", "Spell 'tip' backwards.", "Name a prime number.",
                "Count to five.", "What colour is the sky?", "Say hello.",
                "Add 7 and 8.", "Write a short word."]


def run_demo(output: str | Path) -> Path:
    from rich.table import Table

    from tipcli.progress import console
    from tipcli.rollout import RolloutConfig, run_rollout
    from tipcli.score import ScoreConfig, run_score
    from tipcli.shards import StageDir
    from tipcli.tiny import save_pair

    out = Path(output)
    student, teacher = save_pair(out / "models")
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in DEMO_PROMPTS))
    r = run_rollout(RolloutConfig(student=str(student), prompts=str(prompts),
                                  output=str(out / "rollout"), num_samples=2,
                                  max_new_tokens=32, seed=0))
    s = run_score(ScoreConfig(rollout=str(r), teacher=str(teacher), output=str(out / "score"),
                              top_k=8))
    d = StageDir.open(s, stage="score")
    table = Table(title=f"tip demo: {d.num_sequences} rollouts, {d.num_tokens} response tokens")
    for col in ("statistic", "mean", "min", "max"):
        table.add_column(col, justify="right" if col != "statistic" else "left")
    import torch

    cols = {k: torch.cat([sh[k] for sh in d.iter_shards()]) for k in
            ("student_entropy", "teacher_entropy", "rkl", "fkl", "jsd", "teacher_logprob")}
    for k, v in cols.items():
        table.add_row(k, f"{v.mean():.4f}", f"{v.min():.4f}", f"{v.max():.4f}")
    console.print(table)
    return s
