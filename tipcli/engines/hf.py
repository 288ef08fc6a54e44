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
from tipcli.models.loading import model_vocab_size, real_vocab_size

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


class HFSampler:
    """Batched ``generate`` on a loaded model (a ``Sampler``); ``sample`` draws one batch."""

    name = "hf"

    def __init__(self, model, tok):
        self.model, self.tok = model, tok
        self.eos = eos_ids(model, tok)
        self.padded = list(range(real_vocab_size(tok), model_vocab_size(model)))

    def update_weights(self, model) -> None:
        """Sample from ``model`` from now on (the trained student: no copy is made)."""
        self.model = model

    def close(self) -> None:
        """Nothing beyond the model, which belongs to the caller."""

    @property
    def device(self):
        return self.model.get_input_embeddings().weight.device

    @property
    def context(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def sample_shard(self, prompts: list[list[int]], keys: list[tuple[int, int]],
                     cfg: Sampling, seed: int, shard: int,
                     advance: Advance | None = None
                     ) -> dict[str, torch.Tensor]:
        """A shard's responses, ``cfg.sample_batch_size`` at a time, each batch seeded from (seed,
        shard, batch). ``keys`` (prompt, sample) are the vLLM sampler's seeds; unused here.
        ``advance(sequences, tokens)`` reports progress."""
        parts = []
        for bi in range(0, len(prompts), cfg.sample_batch_size):
            torch.manual_seed(batch_seed(seed, shard, bi // cfg.sample_batch_size))
            out = self.sample(prompts[bi:bi + cfg.sample_batch_size], cfg)
            parts.append(out)
            if advance:
                advance(len(prompts[bi:bi + cfg.sample_batch_size]),
                        int(out["response_mask"].sum()))
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
        return flat_shard(prompts, new.tolist(), logprob_BS, self.eos)

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
