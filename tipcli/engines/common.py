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

from tipcli.records import RolloutBatch
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


def flat_shard(prompts: list[list[int]], new_BS: torch.Tensor, logprob_BS: torch.Tensor,
               eos: list[int], keys: list[tuple[int, int]] | None = None,
               lengths_B: torch.Tensor | None = None) -> RolloutBatch:
    """A rollout shard from generated rows ``new_BS`` (each row's first ``lengths_B``
    tokens generated, all of them when not given), each cut after its first EOS; on the
    rows' device, one copy to the host at the end. ``logprob_BS``: each generated token's
    log-prob; ``keys``: each row's (prompt, sample) index."""
    B, S = new_BS.shape
    steps_BS = torch.arange(S, device=new_BS.device).expand(B, S)
    generated_BS = steps_BS < (lengths_B.to(new_BS.device)[:, None] if lengths_B is not None
                               else S)
    is_eos_BS = torch.isin(new_BS, torch.tensor(eos, dtype=new_BS.dtype,
                                                device=new_BS.device)) & generated_BS
    stopped_B = is_eos_BS.any(1)
    keep_B = torch.where(stopped_B, is_eos_BS.int().argmax(1) + 1, generated_BS.sum(1))
    kept_BS = steps_BS < keep_B[:, None]
    lengths = keep_B.cpu()
    return RolloutBatch(
        prompt_ids_L=torch.tensor([t for p in prompts for t in p], dtype=torch.int32),
        prompt_offsets_N1=offsets([len(p) for p in prompts]),
        response_ids_T=new_BS[kept_BS].to("cpu", torch.int32),
        response_offsets_N1=offsets(lengths.tolist()),
        response_mask_T=torch.ones(int(lengths.sum()), dtype=torch.bool),
        rollout_logprob_T=logprob_BS.to(new_BS.device)[kept_BS].float().cpu(),
        finish_reason_N=torch.where(stopped_B.cpu(), FINISH_EOS, FINISH_LENGTH).to(torch.uint8),
        prompt_index_N=None if keys is None else torch.tensor([p for p, _ in keys]),
        sample_index_N=None if keys is None else torch.tensor([s for _, s in keys]))


def concat(parts: list[RolloutBatch]) -> RolloutBatch:
    """Join batches of one shard, shifting offsets."""
    tensors = [p.tensors() for p in parts]
    joined = {}
    for name in tensors[0]:
        values = [t[name] for t in tensors]
        if name.endswith("_offsets"):
            offs, base = [values[0][:1]], 0
            for v in values:
                offs.append(v[1:] + base)
                base += int(v[-1])
            joined[name] = torch.cat(offs)
        else:
            joined[name] = torch.cat(values)
    return RolloutBatch.from_tensors(joined, parts[0].policy_version)
