"""Samplers: how the responses of a rollout (and of `tip eval`) are drawn.

    tip rollout --student S --prompts P -o runs/rollout --backend hf     # transformers
    tip rollout --student S --prompts P -o runs/rollout --backend vllm   # vLLM, an extra

A sampler turns token-id prompts into the flat tensors of a rollout shard
(``docs/format.md``): responses up to and including EOS, the finish reason, and each
sampled token's log-prob under the distribution it was drawn from (the logits over the
real vocabulary divided by the temperature, truncated by top-k, then top-p, as
transformers' warpers do; at temperature 0, greedy, the plain log-softmax).

The ``hf`` sampler runs ``generate`` with KV cache and left padding; its logits processors
apply the temperature, top-k and top-p themselves and the last one records the
log-softmax of the processed scores, so each sampled token's log-prob comes from the very
scores it was sampled from, with no second forward pass. Sampling settings from a
model's own ``generation_config.json`` (repetition penalty, min-p, ...) are switched off.
A batch's randomness comes from the global torch generator, seeded by the caller.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import (LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper,
                          TopKLogitsWarper, TopPLogitsWarper)

from tipcli.configs import Runtime, Sampling
from tipcli.models import (load_model, model_vocab_size, real_vocab_size, resolve_device,
                           resolve_dtype)
from tipcli.parallel import Processes
from tipcli.shards import FINISH_EOS, FINISH_LENGTH, offsets

# Settings a model's generation_config may carry that would change the sampling
# distribution behind rollout_logprob's back. (transformers fills a None from the model's
# defaults, so these are explicit.)
NEUTRAL_GENERATION = dict(repetition_penalty=1.0, min_p=0.0, typical_p=1.0,
                          epsilon_cutoff=0.0, eta_cutoff=0.0, no_repeat_ngram_size=0)


class LogprobRecorder(LogitsProcessor):
    """The last logits processor: keeps the log-softmax of the processed scores of each
    step and, one step later (once the sampled token is in ``input_ids``), the sampled
    token's entry. One (batch x vocabulary) buffer at a time."""

    def __init__(self) -> None:
        self.prev: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor):
        if self.prev is not None:
            self.steps.append(self.prev.gather(-1, input_ids[:, -1:]).squeeze(-1).cpu())
        self.prev = torch.log_softmax(scores.float(), -1)
        return scores

    def finish(self, last_B: torch.Tensor) -> torch.Tensor:
        """float32 [B, steps]: the log-prob of every generated token."""
        if self.prev is not None:
            self.steps.append(self.prev.gather(-1, last_B[:, None].to(self.prev.device))
                              .squeeze(-1).cpu())
            self.prev = None
        return torch.stack(self.steps, 1) if self.steps else torch.zeros(len(last_B), 0)


def eos_ids(model, tok) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.append(tok.eos_token_id)
    return [int(i) for i in ids]


def batch_seed(seed: int, shard: int, batch: int) -> int:
    """The torch seed of one generation batch: a batch's samples follow from its place."""
    return (seed * 1_000_003 + shard * 10_007 + batch) % (2**63)


def make_sampler(name: str, tok, sampling: Sampling, runtime: Runtime,
                 procs: Processes = Processes(), model=None):
    """The sampler ``sampling.backend`` names, for model ``name`` (or a loaded ``model``)."""
    if sampling.backend == "vllm":
        from tipcli.vllm_sampler import VLLMSampler

        return VLLMSampler(name, tok, runtime, procs, gpu_memory=sampling.vllm_gpu_memory)
    if model is None:
        device = procs.device if procs.world > 1 and runtime.device == "auto" else \
            resolve_device(runtime.device)
        model = load_model(name, device, resolve_dtype(runtime.dtype, device),
                           runtime.trust_remote_code)
    return HFSampler(model, tok)


class HFSampler:
    """Batched ``generate`` on a loaded model; ``sample`` draws one batch."""

    name = "hf"

    def __init__(self, model, tok):
        self.model, self.tok = model, tok
        self.eos = eos_ids(model, tok)
        self.padded = list(range(real_vocab_size(tok), model_vocab_size(model)))

    @property
    def device(self):
        return self.model.get_input_embeddings().weight.device

    @property
    def context(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def sample_shard(self, prompts: list[list[int]], keys: list[tuple[int, int]],
                     cfg: Sampling, seed: int, shard: int,
                     advance: Callable[[int, int], None] | None = None
                     ) -> dict[str, torch.Tensor]:
        """A shard's responses, ``cfg.batch_size`` at a time, each batch seeded from (seed,
        shard, batch). ``keys`` (prompt, sample) are the vLLM sampler's seeds; unused here.
        ``advance(sequences, tokens)`` reports progress."""
        parts = []
        for bi in range(0, len(prompts), cfg.batch_size):
            torch.manual_seed(batch_seed(seed, shard, bi // cfg.batch_size))
            out = self.sample(prompts[bi:bi + cfg.batch_size], cfg)
            parts.append(out)
            if advance:
                advance(len(prompts[bi:bi + cfg.batch_size]), int(out["response_mask"].sum()))
        return concat(parts)

    def sample(self, prompts: list[list[int]], cfg: Sampling) -> dict[str, torch.Tensor]:
        """One left-padded batch; the caller seeds torch's generator first."""
        width = max(len(p) for p in prompts)
        pad = self.tok.pad_token_id
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, p in enumerate(prompts):
            ids[b, width - len(p):] = torch.tensor(p)
            mask[b, width - len(p):] = 1
        recorder, was_training = LogprobRecorder(), self.model.training
        self.model.eval()
        with torch.no_grad():
            out = self.model.generate(input_ids=ids.to(self.device),
                                      attention_mask=mask.to(self.device),
                                      logits_processor=_processors(cfg, recorder),
                                      **self._generate_kwargs(cfg))
        self.model.train(was_training)
        new = out[:, width:].cpu()
        logprob_BS = recorder.finish(new[:, -1])
        return _flat(prompts, new.tolist(), logprob_BS, self.eos)

    def _generate_kwargs(self, cfg: Sampling) -> dict:
        sample = cfg.temperature > 0  # the warpers are ours (``_processors``): none of its own
        kw = dict(do_sample=sample, max_new_tokens=cfg.max_new_tokens,
                  pad_token_id=self.tok.pad_token_id, eos_token_id=self.eos, use_cache=True,
                  temperature=1.0 if sample else None, top_k=0 if sample else None,
                  top_p=1.0 if sample else None, **NEUTRAL_GENERATION)
        if self.padded:  # logit columns past the tokenizer's vocabulary are never sampled
            kw["suppress_tokens"] = self.padded
        return kw


def _processors(cfg: Sampling, recorder: LogprobRecorder) -> LogitsProcessorList:
    """Temperature, top-k, top-p (in transformers' order), then the recorder."""
    steps: list[LogitsProcessor] = []
    if cfg.temperature > 0:
        if cfg.temperature != 1.0:
            steps.append(TemperatureLogitsWarper(cfg.temperature))
        if cfg.top_k > 0:
            steps.append(TopKLogitsWarper(top_k=cfg.top_k))
        if cfg.top_p < 1.0:
            steps.append(TopPLogitsWarper(top_p=cfg.top_p))
    return LogitsProcessorList([*steps, recorder])


def concat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
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


def _flat(prompts: list[list[int]], rows: list[list[int]], logprob_BS: torch.Tensor,
          eos: list[int]) -> dict[str, torch.Tensor]:
    """A rollout shard's tensors from generated rows, each cut after its first EOS."""
    responses, finish, logprobs = [], [], []
    for b, row in enumerate(rows):
        cut = next((i for i, t in enumerate(row) if t in eos), None)
        keep = cut + 1 if cut is not None else len(row)
        responses.append(row[:keep])
        logprobs.append(logprob_BS[b, :keep])
        finish.append(FINISH_EOS if cut is not None else FINISH_LENGTH)
    tokens = [t for r in responses for t in r]
    return {
        "prompt_ids": torch.tensor([t for p in prompts for t in p], dtype=torch.int32),
        "prompt_offsets": offsets([len(p) for p in prompts]),
        "response_ids": torch.tensor(tokens, dtype=torch.int32),
        "response_offsets": offsets([len(r) for r in responses]),
        "response_mask": torch.ones(len(tokens), dtype=torch.bool),
        "rollout_logprob": torch.cat(logprobs).float() if logprobs else torch.zeros(0),
        "finish_reason": torch.tensor(finish, dtype=torch.uint8),
    }
