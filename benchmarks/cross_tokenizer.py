"""The aligned path (`--cross-tokenizer force`) against the exact statistics on one pair:
what its estimates cost in accuracy and in the selection, side by side in one run.

    python benchmarks/cross_tokenizer.py --json benchmarks/results/cross_tokenizer_smollm2.json

The pair is the SmolLM2 example's (one tokenizer, so exact statistics exist). One
rollout of the student (``--prompts``, ``--num-samples``, ``--max-new-tokens``) is scored
by `tip score` with the teacher in process (every statistic exact) and by `tip score
--cross-tokenizer force` (the teacher reads the responses' text, tokenized its own way and
aligned by character offsets), for each ``--top-k``: at 0 every divergence is the
span's sampled estimate; at k > 0 a span of one token on each side takes the top-k +
tail estimate over the teacher's candidates that are student tokens. Then, per token: the
estimates against the exact rKL, fKL and JSD (mean, ratio of sums, mean abs error,
Spearman), the teacher log-probs (on the responses the tokenizer writes the same way,
where the teacher reads the student's own tokens; on one-to-one spans; summed per
response), the share of tokens in one-to-one spans, and `tip select --strategy
soft-or --keep 0.5` on both: the share of the exact selection that the aligned one keeps
too. Time is each `tip score` whole (model loading included), in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from served_teacher import (  # noqa: E402
    estimate_stats,
    smollm2_pair,
    soft_or_overlap,
    spearman,
    tip,
)


def one_to_one(rollout: Path, student: str) -> list:
    """Per response token: whether its span is one token on each side (the teacher's
    tokenizer is the student's here)."""
    from tipcli.models.cross import align_response
    from tipcli.models.loading import load_tokenizer
    from tipcli.store.stagedir import StageDir

    tok = load_tokenizer(student)
    flags = []
    for shard in StageDir.open(rollout).iter_shards():
        off = shard["response_offsets"].tolist()
        for a, b in zip(off, off[1:]):
            spans = align_response(tok, tok, shard["response_ids"][a:b].tolist(), "it")[1]
            flags.append(spans.one_to_one_N()[spans.student_span_B()])
    return flags


def compare(exact: Path, aligned: Path, work: Path, k: int, one_T) -> dict:
    import torch

    from tipcli.store.stagedir import StageDir

    names = ("rkl", "fkl", "jsd", "teacher_logprob", "student_logprob")
    a, b = ({f: torch.cat([s[f] for s in StageDir.open(d).iter_shards()]) for f in names}
            for d in (exact, aligned))
    out: dict = {"tokens": int(a["rkl"].numel()), "one_to_one_share": one_T.double().mean().item()}
    for f in ("rkl", "fkl", "jsd"):
        x, y = a[f].double(), b[f].double()
        out[f] = {**estimate_stats(x, y), "spearman_one_to_one": spearman(x[one_T], y[one_T])}
    diff = (b["teacher_logprob"] - a["teacher_logprob"]).double()
    out["teacher_logprob_one_to_one_max_abs_diff"] = diff[one_T].abs().max().item()
    lengths = [int(n) for n in torch.cat([s["response_offsets"].diff()
                                          for s in StageDir.open(exact).iter_shards()])]
    per_seq = torch.stack([d.sum() for d in diff.split(lengths)])
    out["teacher_logprob_per_response_max_abs_diff"] = per_seq.abs().max().item()
    # responses the tokenizer would write the same way (every span one-to-one): the teacher
    # reads exactly the student's tokens, so its log-probs are the exact ones
    whole = [bool(o.all()) for o in one_T.split(lengths)]
    canon = torch.cat([torch.full((n,), w) for n, w in zip(lengths, whole)])
    out["canonical_responses"] = sum(whole) / len(whole)
    out["teacher_logprob_canonical_max_abs_diff"] = diff[canon].abs().max().item() \
        if canon.any() else None
    out["soft_or_0.5_overlap"] = soft_or_overlap(exact, aligned, "aligned", work, k)
    return out


def main(argv: list[str] | None = None) -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--top-k", type=int, nargs="+", default=[0, 64])
    ap.add_argument("--prompts", default=str(ROOT / "examples/smollm2/prompts/train.jsonl"))
    ap.add_argument("--max-prompts", type=int, default=32)
    ap.add_argument("--num-samples", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        student, teacher = smollm2_pair()
        rollout = work / "rollout"
        tip("rollout", "-s", student, "-p", args.prompts, "--max-prompts", args.max_prompts,
            "-o", rollout, "--num-samples", args.num_samples, "--max-new-tokens",
            args.max_new_tokens, "--seed", 0)
        one_T = torch.cat(one_to_one(rollout, student))
        result = {"pair": "smollm2", "student": student, "teacher": teacher, "top_k": {}}
        exact_seconds = tip("score", rollout, "-t", teacher, "-s", student, "--teacher-top-k",
                            8, "-o", work / "exact")
        for k in args.top_k:
            seconds = tip("score", rollout, "-t", teacher, "-s", student, "--teacher-top-k", k,
                          "--cross-tokenizer", "force", "-o", work / f"aligned-{k}")
            row = compare(work / "exact", work / f"aligned-{k}", work, k, one_T)
            row["seconds"] = {"exact": exact_seconds, "aligned": seconds}
            result["top_k"][str(k)] = row
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def report(result: dict) -> None:
    print("| top-k | statistic | exact mean | estimate mean | estimate / exact | mean abs error "
          "| Spearman | Spearman, one-to-one spans |")
    print("|---|---|---|---|---|---|---|---|")
    for k, row in result["top_k"].items():
        for f in ("rkl", "fkl", "jsd"):
            s = row[f]
            print(f"| {k} | {f} | {s['exact_mean']:.4f} | {s['estimate_mean']:.4f} | "
                  f"{s['estimate_share']:.3f} | {s['mean_abs_error']:.4f} | "
                  f"{s['spearman']:.3f} | {s['spearman_one_to_one']:.3f} |")
    print()
    print("| top-k | tokens | one-to-one share | canonical responses | teacher log-prob, "
          "canonical responses (max abs) | one-to-one (max abs) | per response (max abs) | "
          "soft-or 0.5 overlap | exact score (s) | aligned (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k, row in result["top_k"].items():
        sec = row["seconds"]
        print(f"| {k} | {row['tokens']:,} | {100 * row['one_to_one_share']:.1f}% | "
              f"{100 * row['canonical_responses']:.1f}% | "
              f"{row['teacher_logprob_canonical_max_abs_diff']:.1e} | "
              f"{row['teacher_logprob_one_to_one_max_abs_diff']:.1e} | "
              f"{row['teacher_logprob_per_response_max_abs_diff']:.1e} | "
              f"{100 * row['soft_or_0.5_overlap']:.1f}% | {sec['exact']:.1f} | "
              f"{sec['aligned']:.1f} |")


if __name__ == "__main__":
    main()
