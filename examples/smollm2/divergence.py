"""How the student's divergence from the teacher splits between kept and dropped tokens.

    python examples/smollm2/divergence.py [--work runs/smollm2] [--row soft-or-0.5]

For the finished runs of one row (all seeds pooled), at the first and the last iteration:
the per-token reverse KL that `tip score` wrote for the training rollouts, its median, the
share of tokens below 0.05 nats, and its mean over the tokens the selection kept and over
those it dropped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def split(run: Path, iteration: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-token reverse KL of one iteration's training rollouts, and its selection mask."""
    import torch

    from tipcli.store.stagedir import StageDir

    stage = run / f"iter-{iteration:03d}"
    rkl = [s["rkl"] for s in StageDir.open(stage / "score").iter_shards(("rkl",))]
    kept = [s["selected"] for s in StageDir.open(stage / "select").iter_shards(("selected",))]
    return torch.cat(rkl).numpy(), torch.cat(kept).bool().numpy()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="runs/smollm2")
    ap.add_argument("--row", default="soft-or-0.5", help="row slug, e.g. soft-or-0.5")
    args = ap.parse_args(argv)
    runs = sorted((Path(args.work) / "runs").glob(f"{args.row}-s*"))
    runs = [r for r in runs if (r / "iter-000" / "select").is_dir()]
    if not runs:
        raise SystemExit(f"no run of {args.row} under {args.work}/runs")
    last = min(len(list(r.glob("iter-*/select"))) for r in runs) - 1
    print(f"{args.row}: {len(runs)} runs ({', '.join(r.name for r in runs)})")
    for iteration in (0, last):
        rkl, kept = map(np.concatenate, zip(*(split(r, iteration) for r in runs)))
        print(f"iteration {iteration}: {rkl.size} tokens, median reverse KL "
              f"{np.median(rkl):.3f}, below 0.05 nats {np.mean(rkl < 0.05):.2%}; mean over "
              f"kept {rkl[kept].mean():.3f} ({kept.sum()}), over dropped "
              f"{rkl[~kept].mean():.3f} ({(~kept).sum()}); kept share of the total "
              f"{rkl[kept].sum() / rkl.sum():.1%}")


if __name__ == "__main__":
    main()
