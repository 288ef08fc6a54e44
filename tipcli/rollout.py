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

from dataclasses import dataclass
from pathlib import Path

from tipcli.config import option, to_dict
from tipcli.errors import TipError

# Settings a model's generation_config may carry that would change the sampling
# distribution behind rollout_logprob's back; tip samples from temperature, top-k and top-p
# alone. (transformers fills a None from the model's defaults, so these are explicit.)
NEUTRAL_GENERATION = dict(repetition_penalty=1.0, min_p=0.0, typical_p=1.0,
                          epsilon_cutoff=0.0, eta_cutoff=0.0, no_repeat_ngram_size=0)


@dataclass(frozen=True)
class RolloutConfig:
    student: str = option("", "Student model: hub id, local directory or .gguf file.")
    prompts: str = option("", "Prompts: .jsonl, .parquet, .csv, a saved dataset or a hub name.")
    output: str = option("", "Output directory.")
    num_samples: int = option(1, "Responses sampled per prompt.")
    temperature: float = option(1.0, "Sampling temperature (0 = greedy).")
    top_p: float = option(1.0, "Nucleus sampling mass (1 = off).")
    top_k: int = option(0, "Sample among the k most likely tokens (0 = off).")
    max_new_tokens: int = option(256, "Most tokens per response.")
    seed: int = option(0, "Random seed; the same seed gives the same rollouts on CPU.")
    batch_size: int = option(8, "Sequences generated together.")
    shard_size: int = option(256, "Sequences per output shard (a multiple of batch_size).")
    max_prompts: int = option(0, "Use only the first N prompts (0 = all).")
    prompt_field: str = option("prompt", "Record field holding the prompt text.")
    messages_field: str = option("messages", "Record field holding chat messages.")
    split: str = option("train", "Dataset split, for datasets with several.")
    device: str = option("auto", "Device: auto, cpu, cuda, cuda:1 ...")
    dtype: str = option("auto", "Model dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16.")
    trust_remote_code: bool = option(False, "Allow model code from the hub (only if you trust it).")
    chunk_size: int = option(0, "Positions per chunk when computing log-probs (0 = auto).")

    def validate(self) -> list[str]:
        p = []
        if not self.student:
            p.append("--student is required")
        if not self.prompts:
            p.append("--prompts is required")
        if not self.output:
            p.append("-o/--output is required")
        if self.num_samples < 1:
            p.append("--num-samples must be at least 1")
        if self.temperature < 0:
            p.append("--temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            p.append("--top-p must be in (0, 1]")
        if self.top_k < 0:
            p.append("--top-k must be >= 0")
        if self.max_new_tokens < 1:
            p.append("--max-new-tokens must be at least 1")
        if self.batch_size < 1:
            p.append("--batch-size must be at least 1")
        if self.shard_size < 1 or self.shard_size % max(self.batch_size, 1):
            p.append("--shard-size must be a positive multiple of --batch-size")
        if self.chunk_size < 0:
            p.append("--chunk-size must be >= 0 (0 = auto)")
        return p


def run_rollout(cfg: RolloutConfig, overwrite: bool = False, model=None, tokenizer=None) -> Path:
    """Sample responses and write a rollout directory; returns its path.

    ``model``/``tokenizer`` may be passed in already loaded (the on-policy loop does)."""
    import torch

    from tipcli.models import load_model, load_tokenizer, model_ref, resolve_device, \
        resolve_dtype, tokenizer_info
    from tipcli.progress import progress
    from tipcli.prompts import encode_prompt, load_prompts
    from tipcli.shards import StageWriter

    records = load_prompts(cfg.prompts, cfg.prompt_field, cfg.messages_field, cfg.split,
                           cfg.max_prompts or None)
    tok = tokenizer or load_tokenizer(cfg.student, cfg.trust_remote_code)
    prompt_ids = [encode_prompt(tok, r, cfg.prompt_field, cfg.messages_field) for r in records]
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise TipError(f"prompt {i} of {cfg.prompts} encodes to no tokens")
    device = resolve_device(cfg.device)
    if model is None:
        model = load_model(cfg.student, device, resolve_dtype(cfg.dtype, device),
                           cfg.trust_remote_code)
    device = next(model.parameters()).device
    writer = StageWriter(cfg.output, "rollout", to_dict(cfg),
                         {"student": model_ref(cfg.student, model)}, tokenizer_info(tok),
                         overwrite=overwrite)
    seqs = [(p, s) for p in range(len(prompt_ids)) for s in range(cfg.num_samples)]
    shards = [seqs[a:a + cfg.shard_size] for a in range(0, len(seqs), cfg.shard_size)]
    if writer.complete:
        return writer.path
    total_tokens = 0
    with progress() as bar:
        task = bar.add_task("rollout", total=len(seqs), tokens=0)
        bar.update(task, advance=sum(len(s) for s in shards[:writer.num_done]))
        for si in range(writer.num_done, len(shards)):
            parts = []
            for bi in range(0, len(shards[si]), cfg.batch_size):
                items = shards[si][bi:bi + cfg.batch_size]
                torch.manual_seed(_batch_seed(cfg.seed, si, bi // cfg.batch_size))
                out = generate_batch(model, tok, [prompt_ids[p] for p, _ in items], cfg, device)
                out["prompt_index"] = torch.tensor([p for p, _ in items])
                out["sample_index"] = torch.tensor([s for _, s in items])
                parts.append(out)
                total_tokens += int(out["response_mask"].sum())
                bar.update(task, advance=len(items), tokens=total_tokens)
            writer.write_shard(si, _concat(parts))
    return writer.finish({"num_sequences": len(seqs), "num_prompts": len(prompt_ids)})


def _batch_seed(seed: int, shard: int, batch: int) -> int:
    return (seed * 1_000_003 + shard * 10_007 + batch) % (2**63)


def _eos_ids(model, tok) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.append(tok.eos_token_id)
    return [int(i) for i in ids]


def generate_batch(model, tok, prompts: list[list[int]], cfg: RolloutConfig, device):
    """Generate one batch (left-padded) and return its flat tensors."""
    import torch

    from tipcli.forward import collate, response_hidden
    from tipcli.models import model_vocab_size, real_vocab_size
    from tipcli.shards import FINISH_EOS, FINISH_LENGTH, offsets
    from tipcli.stats import auto_chunk, head_logits, sampled_logprobs

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
                                   auto_chunk(cfg.chunk_size, real_vocab_size(tok)),
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
    import torch

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
