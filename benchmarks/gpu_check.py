"""The scale path on one GPU, in one short run: sampling, scoring, and sharded training.

    python benchmarks/gpu_check.py --out DIR            # CUDA; about 5 minutes on one H200
    python benchmarks/gpu_check.py --out DIR --tiny     # the same steps, small, on any device

A student and a teacher of Qwen3-0.6B's shape (hidden 1024, 28 layers, 16 query heads of
128, 8 KV heads, V = 151,936, tied embeddings; random weights, seeds 0 and 1, bf16) share a
tokenizer of 151,643 entries (Qwen's count: the characters tip's tiny models use, then
filler tokens), so every statistic runs over the full vocabulary. Then, each a fresh
command as a user runs it:

1. ``hf`` sampler throughput in one process (``tipcli.engines.sampler``, as
   ``benchmarks/rollout_backends.py`` measures it on CPU): ``--prompts`` x ``--samples``
   responses of up to ``--tokens`` new tokens, ``--batch-size`` sequences at once, after a
   warm-up round; random weights rarely emit EOS, so nearly every response is full length;
2. ``tip rollout``, ``tip score`` (top-64), ``tip select --strategy soft-or --keep 0.5``;
3. ``tip train`` on that selection, and ``tip train --fsdp`` under ``torchrun`` with one
   process (wall time of each command, model loading included; the trained weights of the
   two are compared);
4. ``benchmarks/train_memory.py --arch qwen3-0.6b``: peak step memory and step time of
   the naive full-logits step, tip's step at keep 1.0 and 0.5, and tip's step at keep 0.5
   with the student sharded by FSDP2 (one process).

vLLM is run only where it is installed. Results: ``DIR/gpu_check.json`` and
``DIR/train_memory_qwen3.json``; a summary on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
QWEN_TOKENIZER_SIZE = 151_643


def build_pair(out: Path, tiny: bool, device: str) -> tuple[Path, Path]:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tipcli.models.tiny import build_tokenizer

    tok = build_tokenizer(size=2_000 if tiny else QWEN_TOKENIZER_SIZE)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 vocab_size=2_048) if tiny else \
        dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
             num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151_936)
    paths = []
    for name, seed in (("student", 0), ("teacher", 1)):
        torch.manual_seed(seed)
        config = Qwen3Config(**shape, max_position_embeddings=4096, tie_word_embeddings=True,
                             pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id)
        with torch.device(device):
            model = Qwen3ForCausalLM(config).to(torch.bfloat16)
        d = out / name
        model.save_pretrained(d)
        tok.save_pretrained(d)
        paths.append(d)
        del model
    return paths[0], paths[1]


def sampler_throughput(model: Path, args, backend: str) -> dict:
    from tipcli.configs import Runtime, Sampling
    from tipcli.engines.sampler import make_sampler
    from tipcli.models.loading import load_tokenizer
    from tipcli.models.prompts import encode_prompt

    tok = load_tokenizer(str(model))
    prompts = [encode_prompt(tok, {"prompt": f"Write a short paragraph about topic number {i}: "
                                             "its history, and why it matters today."})
               for i in range(args.prompts)]
    keys = [(p, s) for p in range(args.prompts) for s in range(args.samples)]
    items = [prompts[p] for p, _ in keys]
    cfg = Sampling(backend=backend, max_new_tokens=args.tokens,
                   sample_batch_size=args.batch_size)
    t0 = time.perf_counter()
    sampler = make_sampler(str(model), tok, cfg, Runtime())
    startup = time.perf_counter() - t0
    sampler.sample_shard(items[:8], keys[:8], cfg, seed=99, shard=0)  # warm-up
    sync()
    t0 = time.perf_counter()
    out = sampler.sample_shard(items, keys, cfg, seed=0, shard=0)
    sync()
    seconds = time.perf_counter() - t0
    tokens = out.num_tokens
    if backend == "vllm":
        sampler.close()
    return {"startup_seconds": round(startup, 2), "seconds": round(seconds, 3),
            "new_tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def tip(args: list, procs: int = 0) -> float:
    """Wall seconds of one tip command (``procs``: under torchrun with that many)."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
              "--master_port", "29533"] if procs else [sys.executable]
    t0 = time.perf_counter()
    done = subprocess.run([*launch, "-m", "tipcli", *map(str, args)], env=os.environ.copy(),
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"tip {args[0]} failed:\n{done.stderr[-4000:]}")
    return round(time.perf_counter() - t0, 2)


def max_weight_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def response_tokens(stage: Path) -> int:
    from safetensors import safe_open

    total = 0
    for shard in sorted(stage.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            total += int(f.get_tensor("response_mask").sum())
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="small models and counts (a dry run)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    if args.tiny:
        args.prompts, args.samples, args.tokens, args.batch_size = 4, 2, 16, 8

    import torch

    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result: dict = {"machine": {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": __import__("transformers").__version__},
        "settings": {k: v for k, v in vars(args).items() if k != "out"}}

    def save() -> None:
        (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")

    t0 = time.perf_counter()
    student, teacher = build_pair(work / "models", args.tiny, device)
    result["build_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"models built ({result['build_seconds']} s)", flush=True)

    result["sampling"] = {"hf": sampler_throughput(student, args, "hf")}
    print(f"hf sampler: {result['sampling']['hf']}", flush=True)
    try:
        import vllm  # noqa: F401
    except ImportError:
        result["sampling"]["vllm"] = "not installed on this machine: not run"
    else:
        result["sampling"]["vllm"] = sampler_throughput(student, args, "vllm")
    save()

    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about topic {i}."}) + "\n"
                               for i in range(args.prompts)))
    stages = {}
    stages["rollout"] = tip(["rollout", "--student", student, "--prompts", prompts,
                             "-o", work / "rollout", "--num-samples", args.samples,
                             "--max-new-tokens", args.tokens,
                             "--sample-batch-size", args.batch_size])
    tokens = response_tokens(work / "rollout")
    stages["score"] = tip(["score", work / "rollout", "--teacher", teacher, "-o", work / "score",
                           "--score-batch-size", 16])
    stages["select"] = tip(["select", work / "score", "-o", work / "select",
                            "--strategy", "soft-or", "--keep", 0.5])
    train = ["--train-batch-size", 8, "--max-steps", 4, "--lr", 1e-5, "--seed", 0]
    stages["train"] = tip(["train", work / "select", "-o", work / "train", *train])
    stages["train_fsdp_1proc"] = tip(["train", work / "select", "-o", work / "train-fsdp",
                                      "--fsdp", *train], procs=1)
    result["stages"] = {"seconds": stages, "response_tokens": tokens,
                        "score_response_tokens_per_s": round(tokens / stages["score"], 1),
                        "rollout_new_tokens_per_s": round(tokens / stages["rollout"], 1),
                        "train_vs_fsdp_max_weight_diff":
                            max_weight_diff(work / "train", work / "train-fsdp")}
    print(f"stages: {result['stages']}", flush=True)
    save()

    bench = [sys.executable, str(HERE / "train_memory.py"), "--output",
             str(out / "train_memory_qwen3.json"), "--keeps", "1.0,0.5", "--fsdp-keeps", "0.5"]
    if device == "cuda":
        bench += ["--device", "gpu", "--arch", "qwen3-0.6b", "--batch", "4", "--seq-len",
                  "2048", "--prompt-len", "256", "--chunk-size", "1024", "--steps", "3"]
    else:
        bench += ["--hidden", "64", "--layers", "2", "--vocab", "1000", "--seq-len", "64",
                  "--prompt-len", "16"]
    t0 = time.perf_counter()
    subprocess.run(bench, check=True)
    table = json.loads((out / "train_memory_qwen3.json").read_text())
    result["train_step"] = {"results": table["results"], "table_markdown": table["table_markdown"],
                            "seconds": round(time.perf_counter() - t0, 1)}
    save()
    print(table["table_markdown"])


if __name__ == "__main__":
    main()
