"""Selection speed on synthetic tokens (no model, no files).

    python benchmarks/select_speed.py --tokens 10000000 --repeats 3

Builds ~10M tokens in sequences of 250..750 (mean ~500) with random entropy and
divergences, then times ``tipcli.ops.selection.importance`` (minmax normalisation over
groups of 64 sequences, median thresholds, quadrants and the mask) for each strategy,
best of ``--repeats`` runs, and prints tokens per second of wall time. The process CPU
time of the best run and the 1-minute load average are printed too: on a shared machine
the wall time grows with other processes' load, the CPU time much less.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from tipcli.configs import Selection
from tipcli.ops.selection import token_importance


def synthetic(num_tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths_N = torch.randint(250, 751, (num_tokens // 500 + 1,), generator=g)
    off_N1 = torch.cat([torch.zeros(1, dtype=torch.long), lengths_N.cumsum(0)])
    n = int((off_N1 <= num_tokens).sum()) - 1
    off_N1 = off_N1[:n + 1]
    T = int(off_N1[-1])
    return {"offsets": off_N1, "mask": torch.ones(T, dtype=torch.bool),
            "entropy": torch.rand(T, generator=g) * 4, "rkl": torch.rand(T, generator=g) ** 3,
            "fkl": torch.rand(T, generator=g) ** 3}


def time_strategy(data: dict[str, torch.Tensor], strategy: str,
                  repeats: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of the fastest of ``repeats`` runs."""
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        token_importance(data["offsets"], data["mask"], data["entropy"], data["rkl"], data["fkl"],
                   Selection(strategy=strategy, keep=0.5))
        best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=10_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--strategies", default="soft-or,entropy-sample")
    args = ap.parse_args()
    data = synthetic(args.tokens)
    T = data["mask"].numel()
    print(f"{T:,} tokens, {data['offsets'].numel() - 1:,} sequences, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for strategy in args.strategies.split(","):
        wall, cpu = time_strategy(data, strategy, args.repeats)
        print(f"{strategy:16s} {wall:6.2f} s wall  {T / wall / 1e6:6.2f} M tokens/s  "
              f"(CPU {cpu:.2f} s, load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
