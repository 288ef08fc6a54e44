"""Typed records between the steps of a run: a rollout batch and a scored batch.

A sampler returns a ``RolloutBatch`` (the responses of one rollout shard); the score step
turns it into a ``ScoredBatch`` (the same responses with every per-token statistic). Each
carries its ``policy_version``: the number of optimizer steps the student that sampled it
had taken in this run (0 for a student as it was loaded), which an asynchronous loop needs
to bound how stale the data it trains on may be. The stage directories remain the on-disk
contract: ``tensors()`` is a record's shard, as ``docs/format.md`` lays it out, and
``from_tensors`` reads one back.

Shape letters: N sequences, T response tokens of the batch, L prompt tokens, k top-k.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

@dataclass
class RolloutBatch:
    """Responses to prompts, flat with offsets (a rollout shard)."""

    prompt_ids_L: torch.Tensor          # int32, every prompt's tokens (chat template applied)
    prompt_offsets_N1: torch.Tensor     # int64 [N+1] into prompt_ids_L
    response_ids_T: torch.Tensor        # int32, each response up to and including EOS
    response_offsets_N1: torch.Tensor   # int64 [N+1] into every per-token tensor
    response_mask_T: torch.Tensor       # bool, the tokens to learn from
    rollout_logprob_T: torch.Tensor     # float32, under the distribution it was drawn from
    finish_reason_N: torch.Tensor       # uint8: 0 EOS, 1 max_new_tokens
    prompt_index_N: torch.Tensor | None = None  # int64, the prompt's row in its source
    sample_index_N: torch.Tensor | None = None  # int64, which of its samples
    policy_version: int = 0

    NAMES = {"prompt_ids_L": "prompt_ids", "prompt_offsets_N1": "prompt_offsets",
             "response_ids_T": "response_ids", "response_offsets_N1": "response_offsets",
             "response_mask_T": "response_mask", "rollout_logprob_T": "rollout_logprob",
             "finish_reason_N": "finish_reason", "prompt_index_N": "prompt_index",
             "sample_index_N": "sample_index"}

    @property
    def num_sequences(self) -> int:
        return int(self.response_offsets_N1.numel() - 1)

    @property
    def num_tokens(self) -> int:
        return int(self.response_offsets_N1[-1])

    def tensors(self) -> dict[str, torch.Tensor]:
        """The record as a shard's tensors (by their names in docs/format.md)."""
        return {name: getattr(self, attr) for attr, name in self.NAMES.items()
                if getattr(self, attr) is not None}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], policy_version: int = 0) -> RolloutBatch:
        return cls(**{attr: t.get(name) for attr, name in cls.NAMES.items()},
                   policy_version=policy_version)

    def sequences(self) -> list[dict[str, torch.Tensor]]:
        """One dict per sequence (views, no copies), as ``split_sequences`` cuts a shard."""
        from tipcli.store.stagedir import split_sequences

        return split_sequences(self.tensors())


@dataclass
class ScoredBatch:
    """A rollout batch with the per-token statistics of the score step (a score shard)."""

    rollout: RolloutBatch
    student_logprob_T: torch.Tensor
    teacher_logprob_T: torch.Tensor
    student_entropy_T: torch.Tensor
    rkl_T: torch.Tensor
    fkl_T: torch.Tensor
    jsd_T: torch.Tensor
    teacher_entropy_T: torch.Tensor | None = None       # absent from a served teacher
    teacher_topk_ids_Tk: torch.Tensor | None = None     # absent when top-k is 0
    teacher_topk_logprobs_Tk: torch.Tensor | None = None
    teacher_route_T: torch.Tensor | None = None         # several teachers: each token's

    @property
    def policy_version(self) -> int:
        return self.rollout.policy_version

    def statistics(self) -> dict[str, torch.Tensor]:
        """The statistics alone, by their shard names."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "rollout" and value is not None:
                out[f.name.rsplit("_", 1)[0]] = value
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        """The record as a score shard's tensors: the rollout's, prompt lengths, statistics."""
        lengths_N = self.rollout.prompt_offsets_N1.diff()
        return {**self.rollout.tensors(), **self.statistics(), "prompt_lengths": lengths_N}

    @classmethod
    def from_statistics(cls, rollout: RolloutBatch, stats: dict[str, torch.Tensor]
                        ) -> ScoredBatch:
        """A scored batch from the statistics by their shard names (``ops.stats``)."""
        names = {f.name.rsplit("_", 1)[0]: f.name for f in dataclasses.fields(cls)
                 if f.name != "rollout"}
        unknown = sorted(set(stats) - set(names))
        if unknown:
            raise ValueError(f"not a statistic of a score shard: {', '.join(unknown)}")
        return cls(rollout, **{names[k]: v for k, v in stats.items()})
