"""The embedded tasks: multi-digit addition with a worked scratchpad (the demo's task), and
subtraction with the same scratchpad (the several-teachers example's second task).

    from tipcli.tasks.arithmetic import write_prompts
    write_prompts("arith.jsonl", 200, seed=1)
    tip eval --model M --prompts arith.jsonl --verifier last-number

A prompt is ``"487+65="`` (operands of 2 or 3 digits); the response works through the
columns from the right, each as ``a+b+carry=column sum``, and ends with the result:

    7+5+0=12 8+6+1=15 4+0+1=5 so 552

so the last number of a response is its answer (the ``last-number`` verifier grades it).
Subtraction, ``"487-65="``, works the same columns as ``x-y-borrow=digit``:
``7-5-0=2 8-6-0=2 4-0-0=4 so 422``.
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


OPS = ("+", "-")  # addition (the demo's task) and subtraction, with the same scratchpad


def solve(a: int, b: int, op: str = "+") -> str:
    """The worked response for ``a op b``: one step per column from the right, then ``so``
    and the result. Addition: ``x+y+carry=sum``. Subtraction (``a >= b``):
    ``x-y-borrow=digit``, the digit taken mod 10 (a negative difference borrows from the
    next column)."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        if op == "+":
            s = x + y + carry
            steps.append(f"{x}+{y}+{carry}={s}")
            carry = s // 10
        else:
            d = x - y - carry
            steps.append(f"{x}-{y}-{carry}={d % 10}")
            carry = int(d < 0)
    return " ".join(steps) + f" so {a + b if op == '+' else a - b}"


def _operand(rng: random.Random) -> int:
    digits = rng.choice((2, 3))
    return rng.randrange(10 ** (digits - 1), 10 ** digits)


def random_problem(rng: random.Random, op: str = "+") -> tuple[int, int]:
    """Two operands of 2 or 3 digits each, drawn from ``rng`` (the larger first for
    subtraction)."""
    a, b = _operand(rng), _operand(rng)
    return (a, b) if op == "+" else (max(a, b), min(a, b))


def make_problems(n: int, seed: int, exclude: set[tuple[int, int]] = frozenset(),
                  op: str = "+") -> list[tuple[int, int]]:
    """``n`` distinct operand pairs (2 or 3 digits each), none of them in ``exclude``."""
    rng, seen, out = random.Random(seed), set(exclude), []
    while len(out) < n:
        pair = random_problem(rng, op)
        if pair not in seen:
            seen.add(pair)
            out.append(pair)
    return out


def record(a: int, b: int, op: str = "+") -> dict[str, str]:
    """A prompt record: ``prompt``, ``answer`` and the worked ``solution``."""
    return {"prompt": f"{a}{op}{b}=", "answer": str(a + b if op == "+" else a - b),
            "solution": solve(a, b, op)}


def make_prompts(n: int, seed: int = 0, op: str = "+") -> list[dict[str, str]]:
    """``n`` distinct prompts of ``op``, deterministic in ``seed``."""
    return [record(a, b, op) for a, b in make_problems(n, seed, op=op)]


def held_out_prompts(n: int = 100, op: str = "+") -> list[dict[str, str]]:
    """The test prompts; the model builder never trains on them."""
    return make_prompts(n, TEST_SEED, op)


def write_prompts(path: str | Path, n: int, seed: int = 0, op: str = "+") -> Path:
    """Write ``make_prompts(n, seed, op)`` as JSONL (one record a line); returns the path."""
    return write_records(path, make_prompts(n, seed, op))


def write_records(path: str | Path, records: list[dict]) -> Path:
    """Prompt records as JSONL (one a line); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
    return path
