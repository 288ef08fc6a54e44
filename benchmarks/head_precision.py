"""What float32 heads cost a bf16 model on the CPU: the LM head's logits computed in bf16
(rounded to bf16, then log-softmax in float32) against ``forward.head_logits`` (hidden
states and head rows upcast, the product in float32), side by side in one process.

    python benchmarks/head_precision.py [--vocab 151936] [--hidden 896] [--positions 27 256 2048]

``score``: one chunk of positions, head and log-softmax, no gradient (what `tip score`
does per chunk); ``train``: the same with the backward pass into the hidden states and
the head (what one chunk of a training step does). The two ways alternate, ``--repeats``
times each, after one warm-up; the table gives the median milliseconds per chunk and the
ratio float32 / bf16. Random bf16 weights; the numbers, not the model, are what is timed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from tipcli.ops.forward import head_logits


class _Model:
    """What head_logits reads of a model: its output embeddings and config."""

    def __init__(self, head):
        self.head, self.config = head, type("Config", (), {})()

    def get_output_embeddings(self):
        return self.head


def bf16_head(head: torch.nn.Linear, V: int):
    """The head as it was: bf16 product, bf16 logits (then widened for the softmax)."""
    return lambda hidden: F.linear(hidden, head.weight[:V]).float()


def once(fn, hidden: torch.Tensor, backward: bool) -> float:
    x = hidden.detach().requires_grad_(backward)
    t0 = time.perf_counter()
    if backward:
        torch.log_softmax(fn(x), -1).mean().backward()
    else:
        with torch.no_grad():
            torch.log_softmax(fn(x), -1)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--positions", type=int, nargs="+", default=[27, 256, 2048],
                    help="positions per chunk (the CPU's automatic chunk at V = 151,936 is 27)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", default="", help="write the numbers here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    V, H = args.vocab, args.hidden
    head = torch.nn.Linear(H, V, bias=False).to(torch.bfloat16)
    ways = {"bf16": bf16_head(head, V), "float32": head_logits(_Model(head), V)}
    print(f"V {V:,}, H {H}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print("| positions per chunk | pass | bf16 head (ms) | float32 head (ms) | float32 / bf16 |")
    print("|---|---|---|---|---|")
    result = {"vocab": V, "hidden": H, "threads": torch.get_num_threads(),
              "repeats": args.repeats, "torch": torch.__version__,
              "platform": platform.platform(), "cpu_capability":
              torch.backends.cpu.get_cpu_capability(), "passes": []}
    for P, name, backward in ((P, n, b) for P in args.positions
                              for n, b in (("score", False), ("train", True))):
        hidden = torch.randn(P, H).to(torch.bfloat16)
        times: dict[str, list[float]] = {w: [] for w in ways}
        for fn in ways.values():
            once(fn, hidden, backward)
        for _ in range(args.repeats):
            for w, fn in ways.items():
                head.weight.grad = None
                times[w].append(once(fn, hidden, backward))
        ms = {w: 1000 * statistics.median(t) for w, t in times.items()}
        print(f"| {P} | {name} | {ms['bf16']:.1f} | {ms['float32']:.1f} | "
              f"{ms['float32'] / ms['bf16']:.2f} |")
        result["passes"].append({"positions": P, "pass": name, "median_ms": ms,
                                 "all_seconds": times})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
