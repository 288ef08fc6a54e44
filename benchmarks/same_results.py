"""The same commands, two versions of tip: do they give the same results?

    python benchmarks/same_results.py run --tip OLD/.venv/bin/tip --out /tmp/old --pair tiny
    python benchmarks/same_results.py run --tip .venv/bin/tip --out /tmp/new --pair tiny
    python benchmarks/same_results.py compare /tmp/old /tmp/new

``run`` drives one installation of tip through its command line only (so any two
versions can be compared, whatever their package layout): a rollout, its score, a
selection, training with a top-k loss and with a full-vocabulary loss, and a two-iteration
``tip distill``. ``--pair tiny`` uses two random tiny models that ``run`` builds once into
``--models`` (give both runs the same folder, so both read the same weights); ``--pair
smollm2`` the SmolLM2 example's teacher and its student without 8 layers
(``examples/smollm2``). ``compare`` reads both output trees and prints, for each stage,
the largest difference: rollout tokens (equal or not), score statistics (max abs),
selection masks (equal or not), trained weights (max abs).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pair(kind: str, models: Path, given_student: bool = False) -> tuple[str, str, str]:
    """(student, teacher, prompts file) for ``kind``; the tiny pair built into ``models``."""
    if kind == "smollm2":
        sys.path.insert(0, str(ROOT / "examples" / "smollm2"))
        from run import build_student, teacher_gguf

        teacher = teacher_gguf()
        return ("" if given_student else str(build_student(teacher, 8)), teacher,
                str(ROOT / "examples" / "smollm2" / "prompts" / "train.jsonl"))
    models.mkdir(parents=True, exist_ok=True)
    prompts = models / "prompts.jsonl"
    if not (models / "teacher" / "config.json").is_file():
        try:
            from tipcli.models.tiny import save_pair
        except ImportError:
            from tipcli.tiny import save_pair  # before the package had folders
        save_pair(models)
        prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in (
            "What is 2+3?", "Say hi.", "Count: 1 2 3", "Name a colour.", "Spell cat.",
            "7*6=?", "abc", "Hello there")))
    return str(models / "student"), str(models / "teacher"), str(prompts)


def commands(tip: str, kind: str, student: str, teacher: str, prompts: str, out: Path):
    small = kind == "tiny"
    n, tokens = ("8", "24") if small else ("8", "32")
    rollout, score, select = out / "rollout", out / "score", out / "select"
    train = ["--train-batch-size", "4", "--max-steps", "2", "--lr", "1e-4",
             "--train-chunk-size", "16" if small else "64"]
    return [
        ("rollout", [tip, "rollout", "-s", student, "-p", prompts, "-o", rollout,
                     "--num-samples", "2", "--max-new-tokens", tokens, "--sample-batch-size",
                     "4", "--shard-size", "8", "--max-prompts", n]),
        ("score", [tip, "score", rollout, "-t", teacher, "-o", score, "--teacher-top-k", "8",
                   "--score-batch-size", "3"]),
        ("select", [tip, "select", score, "-o", select, "--keep", "0.5"]),
        ("train-topk", [tip, "train", select, "-o", out / "train-topk", *train]),
        ("train-full", [tip, "train", score, "-o", out / "train-full", "--strategy", "all",
                        "--loss", "rkl-full", "-t", teacher, *train]),
        ("distill", [tip, "distill", "-s", student, "-t", teacher, "-p", prompts, "-o",
                     out / "distill", "--iterations", "2", "--num-samples", "1",
                     "--max-new-tokens", tokens, "--prompts-per-iteration", "4",
                     "--train-batch-size", "4", "--max-steps", "1", "--lr", "1e-4"]),
    ]


def run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    student, teacher, prompts = pair(args.pair, Path(args.models), bool(args.student))
    student = args.student or student
    for name, cmd in commands(args.tip, args.pair, student, teacher, prompts, out):
        print(f"{name}: {' '.join(map(str, cmd[1:3]))} ...", file=sys.stderr, flush=True)
        subprocess.run([str(c) for c in cmd], check=True, stdout=subprocess.DEVNULL,
                       env={**__import__("os").environ, "TIP_QUIET": "1"})


# ----------------------------------------------------------------------------- compare


def shards(d: Path) -> list[dict]:
    from safetensors.torch import load_file

    manifest = json.loads((d / "manifest.json").read_text())
    return [load_file(str(d / s["file"])) for s in manifest["shards"]]


def weights(d: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("model*.safetensors")):
        out.update(load_file(str(f)))
    return out


def max_diff(a: dict, b: dict, names=None) -> float:
    worst = 0.0
    for k in names or sorted(set(a) | set(b)):
        if k not in a or k not in b:
            return float("inf")
        x, y = a[k], b[k]
        if x.shape != y.shape:
            return float("inf")
        if x.is_floating_point():
            worst = max(worst, float((x.double() - y.double()).abs().max()) if x.numel() else 0)
        elif not bool((x == y).all()):
            return float("inf")
    return worst


def compare(args) -> None:
    a, b = Path(args.a), Path(args.b)
    rows = []
    ra, rb = shards(a / "rollout"), shards(b / "rollout")
    same = len(ra) == len(rb) and all(max_diff(x, y, ("prompt_ids", "response_ids")) == 0
                                      for x, y in zip(ra, rb))
    rows.append(("rollout tokens", "equal" if same else "DIFFER",
                 max(max_diff(x, y, ("rollout_logprob",)) for x, y in zip(ra, rb))))
    sa, sb = shards(a / "score"), shards(b / "score")
    stats = ("student_logprob", "teacher_logprob", "student_entropy", "teacher_entropy",
             "rkl", "fkl", "jsd", "teacher_topk_logprobs")
    rows.append(("score statistics", "", max(max_diff(x, y, stats) for x, y in zip(sa, sb))))
    ids = all(max_diff(x, y, ("teacher_topk_ids",)) == 0 for x, y in zip(sa, sb))
    rows.append(("score top-k ids", "equal" if ids else "DIFFER", 0.0))
    ma, mb = shards(a / "select"), shards(b / "select")
    masks = all(max_diff(x, y, ("selected", "quadrant")) == 0 for x, y in zip(ma, mb))
    rows.append(("selection mask", "equal" if masks else "DIFFER",
                 max(max_diff(x, y, ("h", "d", "soft_or")) for x, y in zip(ma, mb))))
    for name in ("train-topk", "train-full"):
        rows.append((f"{name} weights", "", max_diff(weights(a / name), weights(b / name))))
    last = sorted((a / "distill").glob("iter-*"))[-1].name
    rows.append(("distill final weights", "",
                 max_diff(weights(a / "distill" / last / "train"),
                          weights(b / "distill" / last / "train"))))
    for what, verdict, diff in rows:
        print(f"{what:24s} {verdict:7s} max abs difference {diff:.3g}")
    if args.json:
        Path(args.json).write_text(json.dumps([dict(zip(("what", "verdict", "max_abs"), r))
                                               for r in rows], indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--tip", required=True, help="the tip executable of one installation")
    r.add_argument("--out", required=True)
    r.add_argument("--pair", choices=("tiny", "smollm2"), default="tiny")
    r.add_argument("--models", default="runs/same-results-models",
                   help="--pair tiny: where the pair is built once (shared by both runs)")
    r.add_argument("--student", default="", help="this student instead of the pair's (an "
                   "installation too old to build the pair itself is given the other's)")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--json", default="")
    args = ap.parse_args(argv)
    run(args) if args.command == "run" else compare(args)


if __name__ == "__main__":
    main()
