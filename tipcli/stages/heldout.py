"""Held-out evaluation in the on-policy loop: accuracy, and KL to the teacher.

    tip distill ... --eval-prompts heldout.jsonl --eval-metric kl

``accuracy`` is `tip eval` on the eval prompts (greedy, one answer each, graded against
their answer field). ``kl`` needs no answers and says how close the student has come to
the teacher:

- reverse KL, ``heldout_rkl``: the student samples one response to each eval prompt (the
  loop's sampling settings, the same seed at every evaluation), the teacher scores it:
  the mean of KL(p_student || p_teacher) over the response tokens, exact over the
  vocabulary. On-policy, as the training signal is; a student can lower it by collapsing
  into text the teacher finds predictable, so
- forward KL, ``heldout_fkl``: the teacher samples one response to each eval prompt
  (once per run), the student scores it: the mean of KL(p_teacher || p_student) over its
  tokens: how well the student covers what the teacher would say.

Every step is a stage directory (``RUN/.../eval-kl/rollout``, ``score``,
``teacher-score``; the teacher's samples in ``RUN/eval-teacher/rollout``), so a resumed
run reuses what was measured.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from tipcli.configs import (
    DistillConfig,
    EvalConfig,
    RolloutConfig,
    ScoreConfig,
    named_teachers,
    validate,
)
from tipcli.models.prompts import load_prompts
from tipcli.models.teacher import require_in_process
from tipcli.stages.evaluate import run_eval, wilson_interval
from tipcli.stages.rollout import run_rollout
from tipcli.stages.score import run_score
from tipcli.store.stagedir import StageDir

EVAL_SEED_OFFSET = 7919  # the eval samples' seed, apart from the training rollouts' seeds


def heldout_metrics(cfg: DistillConfig, name: str, model, out: Path, tok, teacher,
                    sampler=None) -> dict[str, Any]:
    """The student ``name`` (``model``, loaded) on the eval prompts, into ``out`` (an
    accuracy evaluation) and ``out-kl`` (the KL stages); finished parts are reused."""
    row: dict[str, Any] = {}
    if cfg.eval_metric in ("accuracy", "both"):
        row.update(accuracy(cfg, name, model, out, tok, sampler))
    if cfg.eval_metric in ("kl", "both"):
        row.update(kl(cfg, name, model, out.with_name(out.name + "-kl"), tok, teacher, sampler))
    return row


def accuracy(cfg: DistillConfig, name: str, model, out: Path, tok, sampler=None
             ) -> dict[str, Any]:
    """`tip eval` of the student on the eval prompts into ``out`` (read back when it has
    finished before): greedy, one answer each, at the loop's response length."""
    sampling = dataclasses.replace(EvalConfig().sampling,
                                   max_new_tokens=cfg.sampling.max_new_tokens)
    res = run_eval(validate(EvalConfig(
        model=name, prompts=cfg.eval_prompts, output=str(out), grading=cfg.grading,
        sampling=sampling, seed=cfg.seed, source=_source(cfg), runtime=cfg.runtime)),
        model=model, tokenizer=tok, sampler=sampler)
    return {"accuracy": res.accuracy, "interval_95": list(res.interval),
            **per_teacher(cfg, res.rows)}


def per_teacher(cfg: DistillConfig, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """With several teachers and evaluation prompts that name theirs (``--teacher-field``):
    the accuracy on each teacher's prompts (``per_teacher``); else nothing."""
    several = named_teachers(cfg.teacher)
    if several is None:
        return {}
    records = load_prompts(cfg.eval_prompts, _source(cfg))
    field = cfg.scoring.teacher_field
    names = [r.get(field) if isinstance(r, dict) else None for r in records]
    if not any(n in several for n in names):
        return {}
    out: dict[str, Any] = {}
    for name in several:
        mine = [r for r in rows if names[r["prompt_index"]] == name]
        if mine:
            correct = sum(bool(r["correct"]) for r in mine)
            out[name] = {"accuracy": correct / len(mine), "n": len(mine),
                         "interval_95": list(wilson_interval(correct, len(mine)))}
    return {"per_teacher": out}


def kl(cfg: DistillConfig, name: str, model, out: Path, tok, teacher, sampler=None
       ) -> dict[str, Any]:
    sampling = dataclasses.replace(cfg.sampling, num_samples=1)
    scoring = dataclasses.replace(cfg.scoring, teacher_top_k=0)  # only the divergences are read
    seed = cfg.seed + EVAL_SEED_OFFSET
    own = run_rollout(validate(RolloutConfig(
        student=name, prompts=cfg.eval_prompts, output=str(out / "rollout"), sampling=sampling,
        seed=seed, shard_size=sampling.sample_batch_size * 16, source=_source(cfg),
        runtime=cfg.runtime)), model=model, tokenizer=tok, sampler=sampler)
    scored = run_score(validate(ScoreConfig(
        rollout=str(own), teacher=cfg.teacher, output=str(out / "score"), student=name,
        scoring=scoring, runtime=cfg.runtime)), student=model, teacher=teacher, tokenizer=tok)
    # the teacher's own samples, once per run, by transformers' generate on the teacher in
    # memory: no second engine beside the student's (--backend vllm)
    teachers = run_rollout(validate(RolloutConfig(
        student=cfg.teacher, prompts=cfg.eval_prompts,
        output=str(Path(cfg.output) / "eval-teacher" / "rollout"),
        sampling=dataclasses.replace(sampling, backend="hf"), seed=seed,
        shard_size=sampling.sample_batch_size * 16, source=_source(cfg),
        runtime=cfg.runtime)), model=require_in_process(
            teacher, "--eval-metric kl", "use --eval-metric accuracy").model,
        tokenizer=tok)
    covered = run_score(validate(ScoreConfig(
        rollout=str(teachers), teacher=cfg.teacher, output=str(out / "teacher-score"),
        student=name, scoring=scoring, runtime=cfg.runtime)),
        student=model, teacher=teacher, tokenizer=tok)
    return {"heldout_rkl": mean(StageDir.open(scored), "rkl"),
            "heldout_fkl": mean(StageDir.open(covered), "fkl")}


def _source(cfg: DistillConfig):
    return dataclasses.replace(cfg.source, max_prompts=cfg.eval_max_prompts)


def mean(d: StageDir, name: str) -> float:
    """The mean of a per-token field over a stage directory's response tokens."""
    total, n = 0.0, 0
    for shard in d.iter_shards((name,)):
        total += float(shard[name].double().sum())
        n += shard[name].numel()
    return total / max(n, 1)
