"""Peak memory and time of one training step: kept-token training vs full logits.

    python benchmarks/train_memory.py                    # CPU, writes benchmarks/results/
    python benchmarks/train_memory.py --device gpu       # CUDA: torch.cuda.max_memory_allocated

A random, vocabulary-heavy student (Llama architecture, tied embeddings as in the small
Qwen models, V = 151,936 by default) takes one AdamW step on B x T tokens with the
``rkl-topk`` loss (teacher top-64 targets, random but well formed). Configurations, each
measured in a fresh subprocess:

- ``naive``: the usual transformers step: ``model(input_ids).logits`` for every position,
  ``log_softmax`` over all of them, then the loss on the response positions;
- ``keep=x``: tip's step (``tipcli.stages.train.distill_module``): body on all tokens, hidden states
  gathered at ``floor(x * m)`` random response positions per sequence, head and loss in
  chunks of ``--chunk-size`` positions rebuilt in backward.

Memory method. CPU has no allocator statistics, so each configuration runs in its own
process with ``MALLOC_MMAP_THRESHOLD_=65536`` (every buffer of 64 KiB or more is mmapped and
returned to the kernel when freed, so RSS follows live tensors). After one warm-up step
(AdamW state allocated), the process resets its RSS high-water mark by writing ``5`` to
``/proc/self/clear_refs``, runs the measured step and reads ``VmHWM``; the step's peak is
``VmHWM - VmRSS`` just before the step (model weights and optimizer state excluded, the
gradients allocated during the step included). On CUDA the same delta is
``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()`` after
``reset_peak_memory_stats``. Step time is the mean of the measured steps (wall clock,
``torch.cuda.synchronize`` on GPU), taken in a second fresh process with the default
malloc and ``--threads`` torch threads (default 1: on a shared CPU, two threads that wait
on each other's barriers make timings swing several-fold).
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

KIB = 1024


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4, help="sequences per micro-batch")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--keeps", default="1.0,0.5,0.2,0.1")
    p.add_argument("--arch", choices=("llama", "qwen3-0.6b"), default="llama",
                   help="qwen3-0.6b: Qwen3-0.6B's shape (hidden 1024, 28 layers, 16 heads of "
                        "128, 8 KV heads, V = 151,936), random; --hidden/--layers/--vocab unused")
    p.add_argument("--model", default="",
                   help="a saved model to train instead of a random one (its vocabulary; "
                        "--arch/--hidden/--layers/--vocab unused)")
    p.add_argument("--fsdp-keeps", default="",
                   help="also tip's step with the student sharded by FSDP2 (tipcli.dist.fsdp, "
                        "one process) at these keeps, e.g. 0.5")
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 keeps timings stable on a shared machine)")
    p.add_argument("--output", default="")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--measure", choices=("memory", "time"), default="memory",
                   help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- worker


def build(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if args.model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).train()
        args.vocab = model.config.vocab_size
        return model.cuda() if args.device == "gpu" else model
    if args.arch == "qwen3-0.6b":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        config = Qwen3Config(vocab_size=151_936, hidden_size=1024, intermediate_size=3072,
                             num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                             head_dim=128, max_position_embeddings=max(args.seq_len, 4096),
                             tie_word_embeddings=True)
        args.vocab = config.vocab_size
        with torch.device("cuda" if args.device == "gpu" else "cpu"):
            return Qwen3ForCausalLM(config).train()
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=max(1, args.hidden // 64),
                         num_key_value_heads=max(1, args.hidden // 64),
                         max_position_embeddings=args.seq_len, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).train()
    return model.cuda() if args.device == "gpu" else model


def adamw(module):
    import torch

    return torch.optim.AdamW(module.parameters(), lr=1e-5)


def sequences(args, keep: float) -> list[dict]:
    """Random sequences with teacher top-k targets and ``floor(keep * m)`` kept tokens each."""
    import torch

    g = torch.Generator().manual_seed(1)
    m = args.seq_len - args.prompt_len
    out = []
    for _ in range(args.batch):
        keep_T = torch.zeros(m, dtype=torch.bool)
        keep_T[torch.randperm(m, generator=g)[:max(1, int(keep * m))]] = True
        lp = torch.log_softmax(torch.randn(m, args.vocab, generator=g) * 3, -1)
        top = lp.topk(args.top_k, dim=-1)
        out.append({"prompt_ids": torch.randint(0, args.vocab, (args.prompt_len,), generator=g),
                    "response_ids": torch.randint(0, args.vocab, (m,), generator=g),
                    "keep": keep_T, "quadrant": torch.zeros(m, dtype=torch.uint8),
                    "teacher_topk_ids": top.indices.to(torch.int32),
                    "teacher_topk_logprobs": top.values})
    return out


def naive_step_fn(model, mb, vocab: int, device):
    """model(input_ids).logits -> log_softmax over every position -> loss on responses."""
    import torch

    from tipcli.ops.losses import divergence, teacher_buckets

    optimizer = adamw(model)
    ids, mask = mb.input_ids_BT.to(device), mb.attention_mask_BT.to(device)
    rows, cols = mb.rows_K.to(device), mb.cols_K.to(device)
    top_ids = mb.targets["teacher_topk_ids"].long().to(device)
    log_r = teacher_buckets(mb.targets["teacher_topk_logprobs"].to(device)).float()

    def step():
        logits_BTV = model(input_ids=ids, attention_mask=mask).logits
        logp_BTV = torch.log_softmax(logits_BTV[..., :vocab].float(), -1)
        lq_k = logp_BTV[rows, cols].gather(-1, top_ids)
        tail = torch.log((1 - lq_k.exp().sum(-1, keepdim=True)).clamp_min(1e-12))
        loss = divergence("rkl", torch.cat([lq_k, tail], -1), log_r).sum() / rows.numel()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def tip_step_fn(model, mb, vocab: int, chunk_size: int, device, fsdp: bool = False):
    import torch

    from tipcli.stages.train import distill_module

    module = distill_module(model, "rkl-topk", vocab, 1.0, chunk_size)
    if fsdp:  # as tip train --fsdp shards it, on a mesh of this one process
        from tipcli.dist.fsdp import make_mesh, shard

        mesh, _ = make_mesh(torch.device(device), 1)
        shard(module, mesh, bf16=device == "cuda")
    optimizer = adamw(module)
    args = (mb.input_ids_BT.to(device), mb.attention_mask_BT.to(device), mb.rows_K.to(device),
            mb.cols_K.to(device), {k: v.to(device) for k, v in mb.targets.items()})

    def step():
        loss_sum, loss_K = module(*args)
        (loss_sum / loss_K.numel()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(step, device: str) -> tuple[int, float, int]:
    """(peak bytes above the pre-step level, seconds, pre-step bytes) of one step."""
    import gc

    import torch

    gc.collect()
    if device == "gpu":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, time.perf_counter() - t0, before
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS; read RSS after, so
    before = _status_kib("VmRSS") * KIB            # memory freed meanwhile cannot make it < 0
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    return _status_kib("VmHWM") * KIB - before, seconds, before


def worker(args) -> dict:
    import contextlib

    import torch

    from tipcli.stages.train import make_micro_batch

    mode = args.worker
    keep = 1.0 if mode == "naive" else float(mode.split("=")[1])
    device = "cuda" if args.device == "gpu" else "cpu"
    model = build(args)
    mb = make_micro_batch(sequences(args, keep), pad_id=0)
    if mode == "naive":
        step = naive_step_fn(model, mb, args.vocab, device)
    else:
        step = tip_step_fn(model, mb, args.vocab, args.chunk_size, device,
                           fsdp=mode.startswith("fsdp"))
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" \
        else contextlib.nullcontext()
    torch.set_num_threads(args.threads)
    with amp:
        step()  # warm-up: AdamW state, allocator caches
        runs = [measure(step, args.device)
                for _ in range(args.steps if args.measure == "time" else 1)]
    out = {"config": mode, "keep": keep, "kept_tokens": int(mb.rows_K.numel())}
    if args.measure == "memory":
        return {**out, "peak_step_bytes": runs[0][0], "baseline_bytes": runs[0][2]}
    return {**out, "step_seconds": sum(r[1] for r in runs) / len(runs)}


# ----------------------------------------------------------------------------- driver


def run_config(args, mode: str) -> dict:
    """Memory in one fresh process (mmap threshold set on CPU), time in another (default
    malloc: forcing every buffer through mmap adds page faults that distort timings)."""
    result = {}
    for what in ("memory", "time"):
        cmd = [sys.executable, __file__, "--worker", mode, "--measure", what, *sys.argv[1:]]
        env = {**os.environ, "TIP_QUIET": "1"}
        if what == "memory":
            env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if out.returncode != 0:
            raise SystemExit(f"{mode} ({what}) failed:\n{out.stderr[-3000:]}")
        result.update(json.loads(out.stdout.strip().splitlines()[-1]))
    return result


def table(rows: list[dict], unit_name: str) -> str:
    naive = next(r for r in rows if r["config"] == "naive")
    full = next(r for r in rows if r["config"] == "keep=1.0")
    lines = [f"| step | kept tokens | peak step memory ({unit_name}) | vs naive | step time (s) "
             "| vs keep 1.0 |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        name = "naive (full logits)" if r["config"] == "naive" else \
            f"tip{', FSDP2' if r['config'].startswith('fsdp') else ''}, keep {r['keep']:g}"
        lines.append(f"| {name} | {r['kept_tokens']} | {r['peak_step_bytes'] / 2**20:,.0f} | "
                     f"{ratio(r['peak_step_bytes'], naive['peak_step_bytes'])} | "
                     f"{r['step_seconds']:.2f} | "
                     f"{ratio(r['step_seconds'], full['step_seconds'])} |")
    return "\n".join(lines)


def ratio(value: float, base: float) -> str:
    """``value / base`` to two decimals, or "-" where the base reading is 0 (an in-process
    memory reading can be: the allocator may already hold the pages)."""
    return f"{value / base:.2f}" if base > 0 else "-"


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.model:  # recorded in the results as the model's own
        args.vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    modes = ["naive"] + [f"keep={float(k)}" for k in args.keeps.split(",")] + \
        [f"fsdp keep={float(k)}" for k in args.fsdp_keeps.split(",") if k]
    load_at_start = os.getloadavg()  # other jobs on the machine make timings noisier
    rows = []
    for mode in modes:
        rows.append(run_config(args, mode))
        print(f"{mode}: {rows[-1]['peak_step_bytes'] / 2**20:,.0f} MiB, "
              f"{rows[-1]['step_seconds']:.2f} s", file=sys.stderr)
    by = {r["config"]: r for r in rows}
    result = {
        "setup": {k: v for k, v in vars(args).items()
                  if k not in ("worker", "output", "measure")},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "torch": _version("torch"),
                    "transformers": _version("transformers"),
                    "load_average_at_start": load_at_start},
        "method": __doc__.split("Memory method. ")[1].strip(),
        "results": rows,
        "targets": {
            "peak_keep0.5_over_naive": by["keep=0.5"]["peak_step_bytes"]
            / by["naive"]["peak_step_bytes"],
            "peak_keep0.5_over_naive_target": 0.45,
            "time_keep0.5_over_keep1.0": by["keep=0.5"]["step_seconds"]
            / by["keep=1.0"]["step_seconds"],
            "time_keep0.5_over_keep1.0_target": 0.8,
        } if {"keep=0.5", "keep=1.0"} <= set(by) else {},
        "table_markdown": table(rows, "MiB") if "keep=1.0" in by else "",
    }
    default = Path(__file__).parent / "results" / f"train_memory_{args.device}.json"
    out = Path(args.output or default)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(result["table_markdown"])
    print(out)


if __name__ == "__main__":
    main()
