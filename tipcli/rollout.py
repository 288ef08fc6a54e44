"""`tip rollout`: the student samples responses to prompts.

    tip rollout --student runs/tiny/student --prompts prompts.jsonl -o runs/rollout \
        --num-samples 4 --max-new-tokens 128 --temperature 1.0

Batched generation with KV cache and left padding, stopping at EOS. The output holds
prompt ids, response ids (up to and including EOS), the response mask, the sampling
student's log-prob of each sampled token (under the temperature / top-k / top-p
distribution it was drawn from) and the finish reason. Sequences are cut into
shards of ``shard_size``; each generation batch is seeded from (seed, shard, batch), so
the same seed gives the same output on CPU and a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from tipcli.configs import RolloutConfig, Sampling, to_flat, validate
from tipcli.errors import TipError
from tipcli.forward import collate, head_logits, response_hidden
from tipcli.outputs import check_output
from tipcli.models import (load_model, load_tokenizer, model_ref, model_vocab_size, real_vocab_size,
                           resolve_device, resolve_dtype, tokenizer_info)
from tipcli.progress import progress
from tipcli.prompts import encode_prompt, fit_context, load_prompts
from tipcli.shards import FINISH_EOS, FINISH_LENGTH, StageWriter, offsets
from tipcli.stats import auto_chunk, sampled_logprobs

# Settings a model's generation_config may carry that would change the sampling
# distribution behind rollout_logprob's back; tip samples from temperature, top-k and top-p
# alone. (transformers fills a None from the model's defaults, so these are explicit.)
NEUTRAL_GENERATION = dict(repetition_penalty=1.0, min_p=0.0, typical_p=1.0,
                          epsilon_cutoff=0.0, eta_cutoff=0.0, no_repeat_ngram_size=0)


def run_rollout(cfg: RolloutConfig, overwrite: bool = False, model=None, tokenizer=None) -> Path:
    """Sample responses and write a rollout directory; returns its path.

    ``model``/``tokenizer`` may be passed in already loaded (the on-policy loop does)."""
    validate(cfg)
    rt, sampling = cfg.runtime, cfg.sampling
    check_output(cfg.output, "rollout", (cfg.prompts, cfg.student), overwrite)
    records = load_prompts(cfg.prompts, cfg.source)
    tok = tokenizer or load_tokenizer(cfg.student, rt.trust_remote_code)
    prompt_ids = [encode_prompt(tok, r, cfg.source) for r in records]
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise TipError(f"prompt {i} of {cfg.prompts} encodes to no tokens")
    device = resolve_device(rt.device)
    if model is None:
        model = load_model(cfg.student, device, resolve_dtype(rt.dtype, device),
                           rt.trust_remote_code)
    device = next(model.parameters()).device
    prompt_ids = fit_context(prompt_ids, model, sampling, cfg.prompts)
    writer = StageWriter(cfg.output, "rollout", to_flat(cfg),
                         {"student": model_ref(cfg.student, model)}, tokenizer_info(tok),
                         overwrite=overwrite, sources=(cfg.prompts, cfg.student),
                         inputs={"prompts_sha256": ids_sha256(prompt_ids)})
    seqs = [(p, s) for p in range(len(prompt_ids)) for s in range(sampling.num_samples)]
    shards = [seqs[a:a + cfg.shard_size] for a in range(0, len(seqs), cfg.shard_size)]
    if writer.complete:
        return writer.path
    total_tokens = 0
    with progress() as bar:
        task = bar.add_task("rollout", total=len(seqs), tokens=0)
        bar.update(task, advance=sum(len(s) for s in shards[:writer.num_done]))
        for si in range(writer.num_done, len(shards)):
            parts = []
            for bi in range(0, len(shards[si]), sampling.batch_size):
                items = shards[si][bi:bi + sampling.batch_size]
                torch.manual_seed(_batch_seed(cfg.seed, si, bi // sampling.batch_size))
                out = generate_batch(model, tok, [prompt_ids[p] for p, _ in items], sampling,
                                     device, cfg.chunk_size)
                out["prompt_index"] = torch.tensor([p for p, _ in items])
                out["sample_index"] = torch.tensor([s for _, s in items])
                parts.append(out)
                total_tokens += int(out["response_mask"].sum())
                bar.update(task, advance=len(items), tokens=total_tokens)
            writer.write_shard(si, _concat(parts))
    return writer.finish({"num_sequences": len(seqs), "num_prompts": len(prompt_ids)})


def ids_sha256(prompt_ids: list[list[int]]) -> str:
    """A checksum of the prompts as the model sees them (token ids, chat template applied)."""
    return hashlib.sha256(json.dumps(prompt_ids).encode()).hexdigest()


def _batch_seed(seed: int, shard: int, batch: int) -> int:
    return (seed * 1_000_003 + shard * 10_007 + batch) % (2**63)


def _eos_ids(model, tok) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.append(tok.eos_token_id)
    return [int(i) for i in ids]


def generate_batch(model, tok, prompts: list[list[int]], cfg: Sampling, device,
                   chunk_size: int = 0):
    """Generate one batch (left-padded) and return its flat tensors."""
    width = max(len(p) for p in prompts)
    pad = tok.pad_token_id
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = 1
    eos = _eos_ids(model, tok)
    sample = cfg.temperature > 0
    gen_kwargs = dict(do_sample=sample, max_new_tokens=cfg.max_new_tokens, pad_token_id=pad,
                      eos_token_id=eos, use_cache=True, **NEUTRAL_GENERATION)
    padded = list(range(real_vocab_size(tok), model_vocab_size(model)))
    if padded:  # logit columns past the tokenizer's vocabulary are never sampled
        gen_kwargs["suppress_tokens"] = padded
    if sample:
        gen_kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
    else:
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             **gen_kwargs)
    new = out[:, width:].cpu()
    responses, finish = [], []
    for row in new.tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), None)
        responses.append(row[:cut + 1] if cut is not None else row)
        finish.append(FINISH_EOS if cut is not None else FINISH_LENGTH)
    seqs = [{"prompt_ids": torch.tensor(p), "response_ids": torch.tensor(r)}
            for p, r in zip(prompts, responses)]
    batch = collate(seqs, pad)
    with torch.no_grad():
        hidden = response_hidden(model, batch, device)
        logits = head_logits(model, real_vocab_size(tok), cfg.temperature or 1.0)
        logprob = sampled_logprobs(hidden, batch.tokens_P, logits,
                                   auto_chunk(chunk_size, real_vocab_size(tok)),
                                   cfg.top_k if sample else 0, cfg.top_p if sample else 1.0)
    return {
        "prompt_ids": torch.tensor([t for p in prompts for t in p], dtype=torch.int32),
        "prompt_offsets": offsets([len(p) for p in prompts]),
        "response_ids": batch.tokens_P.to(torch.int32),
        "response_offsets": offsets([len(r) for r in responses]),
        "response_mask": torch.ones(batch.tokens_P.numel(), dtype=torch.bool),
        "rollout_logprob": logprob.float(),
        "finish_reason": torch.tensor(finish, dtype=torch.uint8),
    }


def _concat(parts):
    """Join flat batch tensors, shifting offsets."""
    out = {}
    for name in parts[0]:
        if name.endswith("_offsets"):
            offs, base = [parts[0][name][:1]], 0
            for p in parts:
                offs.append(p[name][1:] + base)
                base += int(p[name][-1])
            out[name] = torch.cat(offs)
        else:
            out[name] = torch.cat([p[name] for p in parts])
    return out
