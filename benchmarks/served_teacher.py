"""A served teacher against the teacher in process: what the top-k estimates cost in
accuracy and in the selection, and the scoring speed, side by side in one run.

    python benchmarks/served_teacher.py --top-k 8 64 --json benchmarks/results/served_teacher.json
    python benchmarks/served_teacher.py --pair tiny --num-samples 4 \
        --json benchmarks/results/served_teacher_tiny.json

The pair is the SmolLM2 example's (``examples/smollm2``), or with ``--pair tiny`` two
random tiny models (``tipcli.models.tiny``). The teacher is served by
`vllm serve` (vLLM's CPU build, from ``--vllm-python``, by default
`.venv-vllm/bin/python`: `make .venv-vllm/.installed`), on 127.0.0.1, in float32, with
``--max-logprobs`` the largest top-k. One rollout of the student (``--prompts``,
``--num-samples``, ``--max-new-tokens``) is scored, for each top-k, twice: `tip score`
with the teacher in process (every statistic exact) and `tip score --teacher-url` (the
divergences the top-k + tail estimate). Then, per token, the estimate against the exact
value of reverse KL, forward KL and JSD, the teacher's log-probs served against computed,
and `tip select --strategy soft-or --keep 0.5` on both: the share of the exact selection
that the estimated one keeps too.

Time is each `tip score`'s wall clock in a fresh process (model loading included, the
server already up and idle during the in-process runs), the two ways alternating,
``--repeats`` times; both share this machine's cores with nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smollm2_pair() -> tuple[str, str]:
    """(student, teacher) as model directories vLLM can serve: the SmolLM2 example's
    student (8 layers removed) and its teacher, the GGUF dequantised into tip's cache."""
    sys.path.insert(0, str(ROOT / "examples" / "smollm2"))
    from run import build_student, teacher_gguf

    from tipcli.models.loading import ModelSpec, _convert_gguf

    gguf = teacher_gguf()
    return str(build_student(gguf, 8)), str(_convert_gguf(ModelSpec.parse(gguf)))


TINY_PROMPTS = ["What is 2+3?", "Say hi.", "Count: 1 2 3", "Name a colour.", "Spell cat.",
                "7*6=?", "Add 4 and 5.", "Is 9 odd?"]


def tiny_pair(work: Path) -> tuple[str, str, str]:
    """(student, teacher, prompts file): random tiny models (tipcli.models.tiny, head size 32, as
    vLLM needs) with the character tokenizer, and a few prompts it can write."""
    from tipcli.models.tiny import build_model, build_tokenizer

    tok = build_tokenizer()
    for name, seed in (("student", 0), ("teacher", 1)):
        build_model(tok, hidden=64, layers=2, heads=2, seed=seed).save_pretrained(work / name)
        tok.save_pretrained(work / name)
    prompts = work / "tiny-prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in TINY_PROMPTS))
    return str(work / "student"), str(work / "teacher"), str(prompts)


class Server:
    def __init__(self, python: str, model: str, max_logprobs: int):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"}
        self.proc = subprocess.Popen(
            [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
             "--served-model-name", "teacher", "--host", "127.0.0.1", "--port", str(port),
             "--dtype", "float32", "--max-logprobs", str(max_logprobs), "--max-model-len",
             "1024", "--enforce-eager"], env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, start_new_session=True)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 900:
            if self.proc.poll() is not None:
                sys.exit("vllm serve stopped:\n" + self.proc.stderr.read()[-3000:])
            try:
                urllib.request.urlopen(self.url + "/v1/models", timeout=5)
                self.start_seconds = time.monotonic() - t0
                return
            except OSError:
                time.sleep(1)
        sys.exit("vllm serve did not start in 15 minutes")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=120)


def tip(*args) -> float:
    env = {**os.environ, "TIP_QUIET": "1"}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "tipcli", *map(str, args)], env=env,
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"tip {' '.join(map(str, args))} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def compare(exact: Path, served: Path, work: Path, k: int) -> dict:
    import torch

    from tipcli.store.stagedir import StageDir

    a, b = StageDir.open(exact), StageDir.open(served)
    cat = {name: {f: torch.cat([s[f] for s in d.iter_shards()]) for f in
                  ("rkl", "fkl", "jsd", "teacher_logprob", "teacher_topk_logprobs")}
           for name, d in (("exact", a), ("served", b))}
    out: dict = {"tokens": int(cat["exact"]["rkl"].numel())}
    for f in ("rkl", "fkl", "jsd"):
        out[f] = estimate_stats(cat["exact"][f].double(), cat["served"][f].double())
    out["teacher_logprob_max_abs_diff"] = max(
        (cat["served"][f] - cat["exact"][f]).abs().max().item()
        for f in ("teacher_logprob", "teacher_topk_logprobs"))
    out["soft_or_0.5_overlap"] = soft_or_overlap(exact, served, "served", work, k)
    return out


def estimate_stats(x, y) -> dict:
    """An estimate ``y`` of the exact per-token values ``x``: means, their ratio of sums,
    mean and max absolute error, Spearman rank correlation."""
    return {"exact_mean": x.mean().item(), "estimate_mean": y.mean().item(),
            "estimate_share": (y.sum() / x.sum()).item(),
            "mean_abs_error": (y - x).abs().mean().item(),
            "max_abs_error": (y - x).abs().max().item(), "spearman": spearman(x, y)}


def soft_or_overlap(exact: Path, other: Path, name: str, work: Path, k: int) -> float:
    """`tip select --strategy soft-or --keep 0.5` on both scores: the share of the exact
    selection that the other keeps too."""
    import torch

    from tipcli.store.stagedir import StageDir

    masks = []
    for label, d in (("exact", exact), (name, other)):
        sel = work / f"select-{label}-{k}"
        tip("select", d, "--strategy", "soft-or", "--keep", 0.5, "-o", sel)
        masks.append(torch.cat([s["selected"] for s in StageDir.open(sel).iter_shards()]).bool())
    return (masks[0] & masks[1]).sum().item() / max(masks[0].sum().item(), 1)


def spearman(x, y) -> float:
    import torch

    rx, ry = x.argsort().argsort().double(), y.argsort().argsort().double()
    return torch.corrcoef(torch.stack([rx, ry]))[0, 1].item()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pair", choices=("smollm2", "tiny"), default="smollm2")
    ap.add_argument("--top-k", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--prompts", default=str(ROOT / "examples/smollm2/prompts/train.jsonl"))
    ap.add_argument("--max-prompts", type=int, default=32)
    ap.add_argument("--num-samples", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm/bin/python"))
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prompts = args.prompts
        if args.pair == "tiny":
            student, teacher, prompts = tiny_pair(work)
        else:
            student, teacher = smollm2_pair()
        rollout = work / "rollout"
        tip("rollout", "-s", student, "-p", prompts, "--max-prompts", args.max_prompts,
            "-o", rollout, "--num-samples", args.num_samples, "--max-new-tokens",
            args.max_new_tokens, "--seed", 0)
        server = Server(args.vllm_python, teacher, max(args.top_k))
        result = {"pair": args.pair, "student": student, "teacher": teacher,
                  "server_start_seconds": round(server.start_seconds, 1), "top_k": {}}
        try:
            for k in args.top_k:
                times: dict[str, list[float]] = {"in process": [], "served": []}
                for r in range(args.repeats):
                    common = ["-s", student, "--teacher-top-k", k]
                    times["in process"].append(tip("score", rollout, "-t", teacher, *common,
                                                   "-o", work / f"exact-{k}-{r}"))
                    times["served"].append(tip("score", rollout, "-t", "teacher", "--teacher-url",
                                               server.url, *common, "-o",
                                               work / f"served-{k}-{r}"))
                row = compare(work / f"exact-{k}-0", work / f"served-{k}-0", work, k)
                row["seconds"] = {w: statistics.median(t) for w, t in times.items()}
                row["seconds_all"] = times
                result["top_k"][str(k)] = row
        finally:
            server.stop()
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def report(result: dict) -> None:
    print(f"{result['pair']} pair: server up in {result['server_start_seconds']} s")
    print("| top-k | statistic | exact mean | estimate mean | estimate / exact | mean abs error "
          "| max abs error | Spearman |")
    print("|---|---|---|---|---|---|---|---|")
    for k, row in result["top_k"].items():
        for f in ("rkl", "fkl", "jsd"):
            s = row[f]
            print(f"| {k} | {f} | {s['exact_mean']:.4f} | {s['estimate_mean']:.4f} | "
                  f"{s['estimate_share']:.3f} | {s['mean_abs_error']:.4f} | "
                  f"{s['max_abs_error']:.3f} | {s['spearman']:.3f} |")
    print()
    print("| top-k | tokens | teacher log-probs, max abs diff | soft-or 0.5 overlap | "
          "in process (s) | served (s) |")
    print("|---|---|---|---|---|---|")
    for k, row in result["top_k"].items():
        sec = row["seconds"]
        print(f"| {k} | {row['tokens']:,} | {row['teacher_logprob_max_abs_diff']:.1e} | "
              f"{100 * row['soft_or_0.5_overlap']:.1f}% | {sec['in process']:.1f} | "
              f"{sec['served']:.1f} |")


if __name__ == "__main__":
    main()
