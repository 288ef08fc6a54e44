"""The embedded task: multi-digit addition with a worked scratchpad (the demo's task).

    from tipcli.tasks.arithmetic import write_prompts
    write_prompts("arith.jsonl", 200, seed=1)
    tip eval --model M --prompts arith.jsonl --verifier last-number

A prompt is ``"487+65="`` (operands of 2 or 3 digits); the response works through the
columns from the right, each as ``a+b+carry=column sum``, and ends with the result:

    7+5+0=12 8+6+1=15 4+0+1=5 so 552

so the last number of a response is its answer (the ``last-number`` verifier grades it).
This module is the task's data: prompts, answers and worked solutions, all seeded. The
demo's models trained on it are built in ``tipcli.tasks.build``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tipcli.store.files import write_atomic

TEST_SEED = 12345  # seed of the held-out test prompts (`held_out_prompts`)
VALID_SEED = 777  # seed of the validation prompts the model builder checks against
NUM_HELD_OUT = 1000  # test prompts that no model is trained or validated on


def solve(a: int, b: int) -> str:
    """The worked response for ``a + b``: one ``x+y+carry=sum`` step per column, then
    ``so`` and the result."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}+{carry}={s}")
        carry = s // 10
    return " ".join(steps) + f" so {a + b}"


def _operand(rng: random.Random) -> int:
    digits = rng.choice((2, 3))
    return rng.randrange(10 ** (digits - 1), 10 ** digits)


def random_problem(rng: random.Random) -> tuple[int, int]:
    """Two operands of 2 or 3 digits each, drawn from ``rng``."""
    return _operand(rng), _operand(rng)


def make_problems(n: int, seed: int, exclude: set[tuple[int, int]] = frozenset()
                  ) -> list[tuple[int, int]]:
    """``n`` distinct operand pairs (2 or 3 digits each), none of them in ``exclude``."""
    rng, seen, out = random.Random(seed), set(exclude), []
    while len(out) < n:
        pair = random_problem(rng)
        if pair not in seen:
            seen.add(pair)
            out.append(pair)
    return out


def record(a: int, b: int) -> dict[str, str]:
    """A prompt record: ``prompt``, ``answer`` (the sum) and the worked ``solution``."""
    return {"prompt": f"{a}+{b}=", "answer": str(a + b), "solution": solve(a, b)}


def make_prompts(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` distinct addition prompts, deterministic in ``seed``."""
    return [record(a, b) for a, b in make_problems(n, seed)]


def held_out_prompts(n: int = 100) -> list[dict[str, str]]:
    """The test prompts; the model builder never trains on them."""
    return make_prompts(n, TEST_SEED)


def write_prompts(path: str | Path, n: int, seed: int = 0) -> Path:
    """Write ``make_prompts(n, seed)`` as JSONL (one record a line); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in make_prompts(n, seed)))
    return path
