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
from types import SimpleNamespace

from tipcli.configs import RolloutConfig
from tipcli.dist.processes import processes
from tipcli.engines.sampler import make_sampler
from tipcli.errors import TipError
from tipcli.models.loading import (
    context_length,
    load_config,
    load_tokenizer,
    model_ref,
    tokenizer_info,
)
from tipcli.models.prompts import encode_prompt, fit_context, load_prompts
from tipcli.models.student import recorded_version
from tipcli.progress import progress_task
from tipcli.store.files import sha256_file
from tipcli.store.layout import PROMPT_RECORDS, ROLLOUT
from tipcli.store.stagedir import StageWriter


def run_rollout(cfg: RolloutConfig, overwrite: bool = False, model=None, tokenizer=None,
                sampler=None, policy_version: int | None = None) -> Path:
    """Sample responses and write a rollout directory; returns its path.

    A ``model``/``tokenizer`` (or a whole ``sampler``) may be passed in already loaded
    (the on-policy loop does); a sampler made here is made only when there is sampling to
    do, and closed. ``policy_version``: the optimizer steps the student has taken in this
    run (default: what its tip train directory records, else 0), kept in the manifest and
    every shard's entry. Under a launcher each process samples its share of the shards
    (``tipcli.dist.processes``)."""
    run = StageWriter.for_run(ROLLOUT, cfg, overwrite)
    rt, sampling = cfg.runtime, cfg.sampling
    procs = processes(rt.device, rt.dist_timeout)
    records = load_prompts(cfg.prompts, cfg.source)
    tok = tokenizer or load_tokenizer(cfg.student, rt.trust_remote_code)
    prompt_ids = [encode_prompt(tok, r, cfg.source) for r in records]
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise TipError(f"prompt {i} of {cfg.prompts} encodes to no tokens")
    described = sampler.model if sampler else model
    if described is None:  # the student's config tells its context: nothing loaded yet
        described = SimpleNamespace(config=load_config(cfg.student, rt.trust_remote_code))
    context = sampler.context if sampler else context_length(described)
    prompt_ids = fit_context(prompt_ids, context, sampling, cfg.prompts)
    version = recorded_version(cfg.student) if policy_version is None else policy_version
    writer = run.start({"student": model_ref(cfg.student, described)}, tokenizer_info(tok),
                       inputs={"prompts_sha256": ids_sha256(prompt_ids)}, procs=procs)
    seqs = [(p, s) for p in range(len(prompt_ids)) for s in range(sampling.num_samples)]
    shards = [seqs[a:a + cfg.shard_size] for a in range(0, len(seqs), cfg.shard_size)]
    if writer.complete:
        return writer.path
    if procs.main:  # every field of each record, for the stages after (a route, metadata)
        writer.write_file(PROMPT_RECORDS, "".join(
            json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records))
    own = sampler is None
    sampler = sampler or make_sampler(cfg.student, tok, sampling, rt, procs, model)
    try:
        _sample(cfg, sampler, writer, prompt_ids, shards, version, procs.main)
    finally:
        if own:
            sampler.close()
    records_file = Path(writer.path) / PROMPT_RECORDS
    return writer.finish({"num_sequences": len(seqs), "num_prompts": len(prompt_ids),
                          "policy_version": version,
                          "prompt_records": {"file": PROMPT_RECORDS, "sha256": sha256_file(
                              records_file) if procs.main else None}},
                         num_shards=len(shards))


def _sample(cfg: RolloutConfig, sampler, writer, prompt_ids, shards, version: int,
            main: bool) -> None:
    """This process's shards, each a ``RolloutBatch`` written as it is drawn."""
    todo = writer.todo(len(shards))
    with progress_task("rollout", sum(len(shards[si]) for si in todo), main) as advance:
        for si in todo:
            items = shards[si]
            batch = sampler.sample_shard([prompt_ids[p] for p, _ in items], items,
                                         cfg.sampling, cfg.seed, si, advance)
            batch.policy_version = version
            writer.write_shard(si, batch.tensors(), policy_version=version)


def ids_sha256(prompt_ids: list[list[int]]) -> str:
    """A checksum of the prompts as the model sees them (token ids, chat template applied)."""
    return hashlib.sha256(json.dumps(prompt_ids).encode()).hexdigest()
