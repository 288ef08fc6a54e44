"""The ``hf`` sampler: transformers' batched ``generate`` on a loaded model.

    tip rollout --student S --prompts P -o runs/rollout --backend hf

``generate`` runs with KV cache and left padding; its logits processors apply the
temperature, top-k and top-p themselves and the last one records the log-softmax of the
processed scores, so each sampled token's log-prob comes from the very scores it was
sampled from, with no second forward pass. Sampling settings from a model's own
``generation_config.json`` (repetition penalty, min-p, ...) are switched off. A batch's
randomness comes from the global torch generator, seeded from (seed, shard, batch).
"""

from __future__ import annotations

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tipcli.configs import Sampling
from tipcli.engines.common import Advance, batch_seed, concat, eos_ids, flat_shard
from tipcli.models.loading import context_length, model_vocab_size, real_vocab_size
from tipcli.records import RolloutBatch

# Settings a model's generation_config may carry that would change the sampling
# distribution behind rollout_logprob's back. (transformers fills a None from the model's
# defaults, so these are explicit.)
NEUTRAL_GENERATION = dict(repetition_penalty=1.0, min_p=0.0, typical_p=1.0,
                          epsilon_cutoff=0.0, eta_cutoff=0.0, no_repeat_ngram_size=0)


class LogprobRecorder(LogitsProcessor):
    """The last logits processor: keeps each step's processed scores and their
    log-normaliser and, one step later (once the sampled token is in ``input_ids``), the
    sampled token's log-prob, on the device: no (batch x vocabulary) log-softmax and no copy
    to the host per step."""

    def __init__(self) -> None:
        self.prev: torch.Tensor | None = None      # the last step's scores [B, V]
        self.prev_lse: torch.Tensor | None = None  # their logsumexp [B], float32
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor):
        if self.prev is not None:
            self._record(input_ids[:, -1])
        self.prev, self.prev_lse = scores, torch.logsumexp(scores.float(), -1)
        return scores

    def _record(self, tokens_B: torch.Tensor) -> None:
        picked_B = self.prev.gather(-1, tokens_B[:, None].to(self.prev.device)).squeeze(-1)
        self.steps.append(picked_B.float() - self.prev_lse)

    def finish(self, last_B: torch.Tensor) -> torch.Tensor:
        """float32 [B, steps], on the device: the log-prob of every generated token."""
        if self.prev is not None:
            self._record(last_B)
            self.prev = self.prev_lse = None
        return torch.stack(self.steps, 1) if self.steps else torch.zeros(len(last_B), 0)


class HFSampler:
    """Batched ``generate`` on a loaded model (a ``Sampler``); ``sample`` draws one batch."""

    name = "hf"

    def __init__(self, model, tok):
        self.model, self.tok = model, tok
        self.eos = eos_ids(model, tok)
        self.padded = list(range(real_vocab_size(tok), model_vocab_size(model)))

    def update_weights(self, model, peft=None) -> None:
        """Sample from ``model`` from now on (the trained student: no copy is made)."""
        self.model = model

    def close(self) -> None:
        """Nothing beyond the model, which belongs to the caller."""

    @property
    def device(self):
        return self.model.get_input_embeddings().weight.device

    @property
    def context(self) -> int | None:
        return context_length(self.model)

    def sample_shard(self, prompts: list[list[int]], keys: list[tuple[int, int]],
                     cfg: Sampling, seed: int, shard: int,
                     advance: Advance | None = None
                     ) -> RolloutBatch:
        """A shard's responses, ``cfg.sample_batch_size`` at a time, each batch seeded from
        (seed, shard, batch). ``keys`` (prompt, sample) name the responses (the vLLM
        sampler's seeds); the batch, not they, seeds a draw here.
        ``advance(sequences, tokens)`` reports progress."""
        parts, size = [], cfg.sample_batch_size
        for bi in range(0, len(prompts), size):
            torch.manual_seed(batch_seed(seed, shard, bi // size))
            out = self.sample(prompts[bi:bi + size], cfg, keys[bi:bi + size])
            parts.append(out)
            if advance:
                advance(out.num_sequences, out.num_tokens)
        return concat(parts)

    def sample(self, prompts: list[list[int]], cfg: Sampling,
               keys: list[tuple[int, int]] | None = None) -> RolloutBatch:
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
        new_BS = out[:, width:]
        logprob_BS = recorder.finish(new_BS[:, -1])
        return flat_shard(prompts, new_BS, logprob_BS, self.eos, keys)

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
        if cfg.sample_top_k > 0:
            steps.append(TopKLogitsWarper(top_k=cfg.sample_top_k))
        if cfg.top_p < 1.0:
            steps.append(TopPLogitsWarper(top_p=cfg.top_p))
    return LogitsProcessorList([*steps, recorder])
