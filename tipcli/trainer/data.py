"""What `tip train` reads: the input directories, the kept tokens, the steps' batches.

The input is a score directory (tokens selected on the fly with ``tip select``'s
functions), a selection directory (its mask, over its parent score directory), or, for
the ``*-full`` losses, a rollout directory. Data order depends only on (seed, epoch), so
the sequences of a step follow from its number: a resumed run sees the same batches.

Shape letters: B sequences, T tokens, K kept positions, k top-k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tipcli.catalog import LOSSES
from tipcli.configs import TrainConfig
from tipcli.errors import TipError
from tipcli.ops.forward import collate
from tipcli.stages.select import check_statistics, selection_by_shard
from tipcli.store.stagedir import StageDir, split_sequences


@dataclass
class Source:
    """The directories a run reads: the input, the score dir (if any) and the student."""

    input: StageDir           # the directory given on the command line
    stats: StageDir           # the one whose shards hold tokens and teacher signal
    selection: list | None    # per shard {"selected", "quadrant"}, or None for all tokens
    student: str
    temperature: float


def open_source(cfg: TrainConfig) -> Source:
    d = StageDir.open(cfg.input, stage=("score", "select", "rollout"),
                      verify=cfg.checks.verify_checksums)
    if d.stage == "select":
        score = d.open_parent("score")
        selection = [d.load_shard(i) for i in range(len(d.shards))]
        if len(selection) != len(score.shards):
            raise TipError(f"{d.path} has {len(selection)} shards but its score directory "
                           f"{score.path} has {len(score.shards)}; run tip select again")
    elif d.stage == "score":
        check_statistics(d, cfg.selection)
        score, selection = d, selection_by_shard(d, cfg.selection, cfg.seed)
    else:
        score, selection = d, None
        _check_rollout_loss(cfg, d)
    student = cfg.student or score.setting("student") or \
        score.manifest["models"]["student"]["id"]
    temperature = float(score.setting("score_temperature")) if score.stage == "score" else 1.0
    return Source(d, score, selection, student, temperature)


def _check_rollout_loss(cfg: TrainConfig, d: StageDir) -> None:
    loss = cfg.training.loss
    if not LOSSES[loss].needs_teacher:
        raise TipError(f"{d.path} is a rollout directory with no teacher signal; --loss "
                       f"{loss} needs a score directory (tip score), or use a *-full loss "
                       "with --teacher")
    if cfg.selection.strategy != "all":
        raise TipError(f"{d.path} is a rollout directory: it holds no statistics to select "
                       "by; pass --strategy all or score it first (tip score)")


def load_sequences(cfg: TrainConfig, src: Source) -> list[dict[str, Any]]:
    """Every sequence with at least one kept token: prompt and response ids, ``keep`` and
    ``quadrant`` per response token, and the per-token tensors the loss reads."""
    needed = LOSSES[cfg.training.loss].targets
    seqs = []
    for i in range(len(src.stats.shards)):
        shard = src.stats.load_shard(i)
        _check_targets(cfg, src, shard, needed)
        keep_T = shard["response_mask"].bool()
        quad_T = torch.zeros_like(keep_T, dtype=torch.uint8)
        if src.selection is not None:
            keep_T = keep_T & src.selection[i]["selected"].bool()
            quad_T = src.selection[i]["quadrant"].to(torch.uint8)
        shard = {**shard, "keep": keep_T, "quadrant": quad_T}
        for seq in split_sequences(shard):
            if bool(seq["keep"].any()):
                seqs.append({n: seq[n] for n in ("prompt_ids", "response_ids", "keep",
                                                 "quadrant", *needed)})
    if not seqs:
        raise TipError(f"the selection of {src.input.path} keeps 0 tokens; raise --keep or "
                       "choose another --strategy")
    return seqs


def _check_targets(cfg: TrainConfig, src: Source, shard: dict, needed: tuple[str, ...]) -> None:
    missing = [n for n in needed if n not in shard]
    if not missing:
        return
    loss = cfg.training.loss
    if LOSSES[loss].form == "topk":
        k = src.stats.setting("teacher_top_k")
        raise TipError(f"--loss {loss} needs the teacher's top-k, but {src.stats.path} was "
                       f"scored with --teacher-top-k {k}; score "
                       "again with --teacher-top-k > 0, or use --loss rkl-sampled or a *-full "
                       "loss")
    raise TipError(f"--loss {loss} needs {', '.join(missing)}, missing from {src.stats.path}")


# ----------------------------------------------------------------------------- batches


def steps_per_epoch(num_sequences: int, cfg: TrainConfig, world: int) -> int:
    return num_sequences // (cfg.optim.train_batch_size * cfg.optim.grad_accum * world)


def step_indices(num_sequences: int, step: int, cfg: TrainConfig, world: int,
                 rank: int) -> list[list[int]]:
    """This process's micro-batches (sequence indices) for optimizer step ``step``.

    A step takes the next ``batch_size x grad_accum x world`` sequences of the epoch's
    order (seeded by seed and epoch); process ``rank`` takes its contiguous share."""
    opt = cfg.optim
    per_epoch = steps_per_epoch(num_sequences, cfg, world)
    epoch, i = divmod(step, per_epoch)
    if opt.shuffle:
        order = torch.randperm(num_sequences,
                               generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
    else:
        order = torch.arange(num_sequences)
    per_rank = opt.train_batch_size * opt.grad_accum
    start = i * per_rank * world + rank * per_rank
    mine = order[start:start + per_rank].tolist()
    return [mine[a:a + opt.train_batch_size] for a in range(0, per_rank, opt.train_batch_size)]


@dataclass
class MicroBatch:
    input_ids_BT: torch.Tensor
    attention_mask_BT: torch.Tensor
    rows_K: torch.Tensor
    cols_K: torch.Tensor
    quadrant_K: torch.Tensor
    targets: dict[str, torch.Tensor]


def make_micro_batch(seqs: list[dict[str, Any]], pad_id: int) -> MicroBatch:
    """Right-padded sequences and, for each kept token, the hidden-state position that
    predicts it and its loss targets."""
    batch = collate(seqs, pad_id)
    keep_P = torch.cat([s["keep"] for s in seqs])
    names = [n for n in seqs[0] if n not in ("prompt_ids", "keep", "quadrant")]
    targets = {n: torch.cat([s[n] for s in seqs])[keep_P] for n in names}
    quad = torch.cat([s["quadrant"] for s in seqs])[keep_P]
    return MicroBatch(batch.input_ids_BT, batch.attention_mask_BT, batch.rows_P[keep_P],
                      batch.cols_P[keep_P], quad, targets)
