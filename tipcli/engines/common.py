"""What every sampler shares: the flat tensors of a rollout shard and the seeds of a draw.

A sampler's output is the rollout shard layout of ``docs/format.md``: prompts and
responses stored flat with offsets, each response up to and including its first EOS, its
finish reason, and each sampled token's log-prob under the distribution it was drawn
from.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

from tipcli.store.stagedir import FINISH_EOS, FINISH_LENGTH, offsets

Advance = Callable[[int, int], None]  # a sampler's progress: (sequences, tokens) just done


def batch_seed(seed: int, shard: int, batch: int) -> int:
    """The torch seed of one generation batch (the hf sampler): a batch's samples follow
    from its place in the rollout, not from the process that draws it."""
    return (seed * 1_000_003 + shard * 10_007 + batch) % (2**63)


def item_seed(seed: int, prompt: int, sample: int) -> int:
    """The seed of one response (the vllm sampler): a hash of (seed, prompt, sample)."""
    digest = hashlib.sha256(f"{seed}:{prompt}:{sample}".encode()).digest()
    return int.from_bytes(digest[:7], "big")


def eos_ids(model, tok) -> list[int]:
    """Every id that ends a response: the model's generation config's and the tokenizer's."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.append(tok.eos_token_id)
    return [int(i) for i in ids]


def flat_shard(prompts: list[list[int]], rows: list[list[int]], logprob_BS: torch.Tensor,
               eos: list[int]) -> dict[str, torch.Tensor]:
    """A rollout shard's tensors from generated rows, each cut after its first EOS
    (``logprob_BS``: each generated token's log-prob, row by row)."""
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
