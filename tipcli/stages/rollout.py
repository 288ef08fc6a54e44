"""`tip rollout`: the student samples responses to prompts.

    tip rollout --student runs/tiny/student --prompts prompts.jsonl -o runs/rollout \
        --num-samples 4 --max-new-tokens 128 --temperature 1.0 --sample-top-k 50

Generation by a sampler (``tipcli.engines.sampler``: transformers' batched ``generate``, or vLLM
with ``--backend vllm``), stopping at EOS. The output holds prompt ids, response ids (up
to and including EOS), the response mask, the sampling student's log-prob of each sampled
token (under the temperature / top-k / top-p distribution it was drawn from) and the
finish reason. Sequences are cut into shards of ``shard_size``; a shard's randomness is
seeded from (seed, shard), so the same seed gives the same output on CPU, a resumed run
equals an uninterrupted one, and so does a run over several processes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from tipcli.configs import RolloutConfig
from tipcli.dist.processes import processes
from tipcli.engines.sampler import make_sampler
from tipcli.errors import TipError
from tipcli.models.loading import load_tokenizer, model_ref, tokenizer_info
from tipcli.models.prompts import encode_prompt, fit_context, load_prompts
from tipcli.progress import progress_task
from tipcli.store.layout import ROLLOUT
from tipcli.store.stagedir import StageWriter


def run_rollout(cfg: RolloutConfig, overwrite: bool = False, model=None, tokenizer=None,
                sampler=None) -> Path:
    """Sample responses and write a rollout directory; returns its path.

    A ``model``/``tokenizer`` (or a whole ``sampler``) may be passed in already loaded
    (the on-policy loop does). Under a launcher each process samples its share of the
    shards (``tipcli.dist.processes``)."""
    run = StageWriter.for_run(ROLLOUT, cfg, overwrite)
    rt, sampling = cfg.runtime, cfg.sampling
    procs = processes(rt.device, rt.dist_timeout)
    records = load_prompts(cfg.prompts, cfg.source)
    tok = tokenizer or load_tokenizer(cfg.student, rt.trust_remote_code)
    prompt_ids = [encode_prompt(tok, r, cfg.source) for r in records]
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise TipError(f"prompt {i} of {cfg.prompts} encodes to no tokens")
    sampler = sampler or make_sampler(cfg.student, tok, sampling, rt, procs, model)
    prompt_ids = fit_context(prompt_ids, sampler.context, sampling, cfg.prompts)
    writer = run.start({"student": model_ref(cfg.student, sampler.model)}, tokenizer_info(tok),
                        inputs={"prompts_sha256": ids_sha256(prompt_ids)}, procs=procs)
    seqs = [(p, s) for p in range(len(prompt_ids)) for s in range(sampling.num_samples)]
    shards = [seqs[a:a + cfg.shard_size] for a in range(0, len(seqs), cfg.shard_size)]
    if writer.complete:
        return writer.path
    todo = writer.todo(len(shards))
    with progress_task("rollout", sum(len(shards[si]) for si in todo), procs.main) as advance:
        for si in todo:
            items = shards[si]
            out = sampler.sample_shard([prompt_ids[p] for p, _ in items], items, sampling,
                                       cfg.seed, si, advance)
            out["prompt_index"] = torch.tensor([p for p, _ in items])
            out["sample_index"] = torch.tensor([s for _, s in items])
            writer.write_shard(si, out)
    return writer.finish({"num_sequences": len(seqs), "num_prompts": len(prompt_ids)},
                         num_shards=len(shards))


def ids_sha256(prompt_ids: list[list[int]]) -> str:
    """A checksum of the prompts as the model sees them (token ids, chat template applied)."""
    return hashlib.sha256(json.dumps(prompt_ids).encode()).hexdigest()
