"""`tip distill`: the on-policy loop, rollout -> score -> select -> train, N times.

    tip distill --student S --teacher T --prompts prompts.jsonl --iterations 3 \
        --strategy soft-or --keep 0.5 --eval-prompts heldout.jsonl -o runs/distill

Iteration i samples from the student trained in iteration i-1 (the first from
``--student``). Every stage directory is kept under ``RUN/iter-NNN/``::

    RUN/manifest.json            the resolved settings (stage "distill") and a summary
    RUN/eval-initial/            the starting student's evaluation (with --eval-prompts)
    RUN/iter-000/prompts.jsonl   this iteration's prompts
    RUN/iter-000/rollout/ score/ select/ train/ eval/

A killed run, started again with the same command, skips the stages already complete
and resumes the one it was in (each stage resumes itself). Both models stay loaded for
the whole run: the student trained in one iteration samples the next, without a trip
through the disk. (Where sampling runs in bf16, on GPU, training reloads the float32
weights that the previous iteration saved, so no update is lost to rounding.)
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tipcli.config import option, to_dict
from tipcli.errors import TipError


@dataclass(frozen=True)
class DistillConfig:
    student: str = option("", "Starting student: hub id, local directory or .gguf file.")
    teacher: str = option("", "Teacher model: hub id, local directory or .gguf file.")
    prompts: str = option("", "Training prompts: .jsonl, .parquet, .csv or a dataset.")
    output: str = option("", "Run directory; every iteration's stages are kept inside.")
    iterations: int = option(2, "On-policy iterations (rollout -> score -> select -> train).")
    prompts_per_iteration: int = option(0, "Prompts sampled for each iteration (0 = all).")
    num_samples: int = option(4, "Responses sampled per prompt.")
    max_new_tokens: int = option(128, "Most tokens per response.")
    temperature: float = option(1.0, "Sampling temperature of the rollouts.")
    top_p: float = option(1.0, "Nucleus sampling mass of the rollouts (1 = off).")
    rollout_batch_size: int = option(16, "Sequences generated together.")
    top_k: int = option(64, "Teacher top-k stored by the score stage.")
    strategy: str = option("soft-or", "Token selection strategy (as tip select).")
    keep: float = option(0.5, "Fraction of response tokens trained on.")
    scope: str = option("sequence", "Selection budget per 'sequence' or per 'group'.")
    divergence: str = option("rkl", "Divergence the selection ranks by: rkl, fkl, jsd.")
    normalize: str = option("minmax", "Selection normalisation: minmax, bound, rank.")
    group_size: int = option(64, "Sequences per selection normalisation group.")
    loss: str = option("rkl-topk", "Training loss (as tip train).")
    lr: float = option(1e-5, "Peak learning rate of AdamW.")
    warmup: int = option(0, "Warmup steps of each iteration's schedule.")
    epochs: int = option(1, "Passes over each iteration's rollouts.")
    max_steps: int = option(0, "Optimizer steps per iteration (0 = --epochs passes).")
    batch_size: int = option(8, "Sequences per training micro-batch.")
    grad_accum: int = option(1, "Micro-batches per optimizer step.")
    eval_prompts: str = option("", "Prompts with answers to evaluate the student after each "
                                   "iteration (empty = no evaluation).")
    eval_max_prompts: int = option(0, "Evaluate on the first N eval prompts (0 = all).")
    verifier: str = option("auto", "Grader for --eval-prompts (as tip eval).")
    seed: int = option(0, "Seed of sampling, selection and training.")
    device: str = option("auto", "Device: auto, cpu, cuda ...")
    trust_remote_code: bool = option(False, "Allow model code from the hub (only if you trust it).")

    def validate(self) -> list[str]:
        from tipcli.select import SelectConfig
        from tipcli.train import TrainConfig

        p = [f"--{n} is required" for n in ("student", "teacher", "prompts")
             if not getattr(self, n)]
        if not self.output:
            p.append("-o/--output is required")
        if self.iterations < 1:
            p.append("--iterations must be at least 1")
        if self.prompts_per_iteration < 0 or self.eval_max_prompts < 0:
            p.append("--prompts-per-iteration and --eval-max-prompts must be >= 0")
        # the stage configs check the options they receive
        p += SelectConfig(score="-", output="-", **self._select_kw()).validate()
        p += [x for x in TrainConfig(input="-", output="-", **self._train_kw()).validate()
              if x not in p]
        return p

    def _select_kw(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("strategy", "keep", "scope", "divergence",
                                              "normalize", "group_size", "seed")}

    def _train_kw(self) -> dict[str, Any]:
        from tipcli.train import FULL_LOSSES

        kw = {k: getattr(self, k) for k in ("loss", "lr", "warmup", "epochs", "max_steps",
                                            "batch_size", "grad_accum", "seed",
                                            "trust_remote_code")}
        if self.loss in FULL_LOSSES:  # exact losses need the teacher during training
            kw["teacher"] = self.teacher
        return kw


def iter_dir(cfg: DistillConfig, i: int) -> Path:
    return Path(cfg.output) / f"iter-{i:03d}"


def run_distill(cfg: DistillConfig) -> Path:
    """Run (or resume) the loop; returns the run directory."""
    import torch

    from tipcli.evaluate import SUMMARY as EVAL_SUMMARY
    from tipcli.models import (check_same_vocab, load_model, load_tokenizer, resolve_device,
                               resolve_dtype)
    from tipcli.prompts import load_prompts

    records = load_prompts(cfg.prompts)
    s_tok = load_tokenizer(cfg.student, cfg.trust_remote_code)
    check_same_vocab(s_tok, load_tokenizer(cfg.teacher, cfg.trust_remote_code),
                     cfg.student, cfg.teacher)
    run = Path(cfg.output)
    _write_run_manifest(cfg, complete=False)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype("auto", device)
    teacher = load_model(cfg.teacher, device, dtype, cfg.trust_remote_code)
    student_name, student = cfg.student, None
    history = []
    if cfg.eval_prompts:
        if not (run / "eval-initial" / EVAL_SUMMARY).is_file():
            student = load_model(student_name, device, dtype, cfg.trust_remote_code)
        history.append({"iteration": "initial",
                        **_evaluate(cfg, cfg.student, run / "eval-initial", device,
                                    student, s_tok)})
    for i in range(cfg.iterations):
        if student is None:
            student = load_model(student_name, device, dtype, cfg.trust_remote_code)
        select, row = _sample_score_select(cfg, i, records, student_name, student, teacher,
                                           s_tok)
        if student.dtype != torch.float32:  # bf16 for sampling; training reloads float32
            student = None
        train, student = _train(cfg, select, iter_dir(cfg, i) / "train", student, teacher)
        if student is not None:  # the trained student stays loaded for the next iteration
            student.to(dtype)
        row["train_loss"] = _last_metrics(train).get("loss")
        student_name = str(train)
        if cfg.eval_prompts:
            row.update(_evaluate(cfg, student_name, iter_dir(cfg, i) / "eval", device,
                                 student, s_tok))
        history.append(row)
    _write_run_manifest(cfg, complete=True, summary={"history": history,
                                                     "final_student": student_name})
    _render(history)
    return run


def _sample_score_select(cfg, i, records, student_name, student, teacher,
                         tok) -> tuple[Path, dict[str, Any]]:
    """Rollout, score and select of iteration ``i`` on the loaded models (finished stages
    are kept); returns the selection directory and the iteration's summary row."""
    from tipcli.rollout import RolloutConfig, run_rollout
    from tipcli.score import ScoreConfig, run_score
    from tipcli.select import SelectConfig, run_select
    from tipcli.shards import StageDir

    d = iter_dir(cfg, i)
    d.mkdir(parents=True, exist_ok=True)
    prompts = _iteration_prompts(cfg, i, records, d / "prompts.jsonl")
    rollout = run_rollout(RolloutConfig(
        student=student_name, prompts=str(prompts), output=str(d / "rollout"),
        num_samples=cfg.num_samples, temperature=cfg.temperature, top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens, seed=cfg.seed * 1000 + i,
        batch_size=cfg.rollout_batch_size, shard_size=cfg.rollout_batch_size * 16,
        device=cfg.device, trust_remote_code=cfg.trust_remote_code), model=student, tokenizer=tok)
    score = run_score(ScoreConfig(
        rollout=str(rollout), teacher=cfg.teacher, output=str(d / "score"),
        student=student_name, top_k=cfg.top_k, device=cfg.device,
        trust_remote_code=cfg.trust_remote_code), student=student, teacher=teacher,
        tokenizer=tok)
    select = run_select(SelectConfig(score=str(score), output=str(d / "select"),
                                     **cfg._select_kw()))
    sd = StageDir.open(score, stage="score")
    kept = StageDir.open(select, stage="select").manifest["summary"]
    return select, {"iteration": i, "rollout_tokens": sd.num_tokens,
                    "mean_rkl": _mean(sd, "rkl"), "selection": kept}


def _train(cfg: DistillConfig, select: Path, out: Path, student, teacher):
    """Train (or resume, or keep a finished) iteration; returns the directory and the
    trained student, or None where the stage had already finished."""
    from tipcli.shards import MANIFEST
    from tipcli.train import CHECKPOINTS, TrainConfig, train_model

    tcfg = TrainConfig(input=str(select), output=str(out), **cfg._train_kw(),
                       save_every=max(1, cfg.max_steps // 4) if cfg.max_steps else 0)
    mpath = out / MANIFEST
    if mpath.is_file() and json.loads(mpath.read_text()).get("complete"):
        return out, None
    started = mpath.is_file()
    resumable = started and any((out / CHECKPOINTS).glob("step-*"))
    # the teacher is used only where the loss needs it (``tcfg.teacher`` set)
    return train_model(tcfg, overwrite=started and not resumable, resume=resumable,
                       student=student, teacher=teacher)


def _iteration_prompts(cfg, i, records, path: Path) -> Path:
    """This iteration's prompts (all, or a seeded sample of them), written for the record."""
    if not path.is_file():
        chosen = records
        if cfg.prompts_per_iteration and cfg.prompts_per_iteration < len(records):
            chosen = random.Random(cfg.seed * 1000 + i).sample(records,
                                                               cfg.prompts_per_iteration)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in chosen))
        tmp.replace(path)
    return path


def _evaluate(cfg: DistillConfig, model: str, out: Path, device: str, loaded=None,
              tok=None) -> dict[str, Any]:
    from tipcli.evaluate import SUMMARY, EvalConfig, run_eval

    if (out / SUMMARY).is_file():
        s = json.loads((out / SUMMARY).read_text())
    else:
        res = run_eval(EvalConfig(model=model, prompts=cfg.eval_prompts, output=str(out),
                                  verifier=cfg.verifier, max_new_tokens=cfg.max_new_tokens,
                                  max_prompts=cfg.eval_max_prompts, seed=cfg.seed,
                                  device=device, trust_remote_code=cfg.trust_remote_code),
                       model=loaded, tokenizer=tok)
        s = res.summary()
    return {"accuracy": s["accuracy"], "interval_95": s["interval_95"]}


def _mean(d, name: str) -> float:
    total, n = 0.0, 0
    for shard in d.iter_shards():
        total += float(shard[name].double().sum())
        n += shard[name].numel()
    return total / max(n, 1)


def _last_metrics(train: Path) -> dict[str, Any]:
    from tipcli.train import METRICS

    lines = (Path(train) / METRICS).read_text().splitlines() if (Path(train) / METRICS).is_file() \
        else []
    return json.loads(lines[-1]) if lines else {}


def _write_run_manifest(cfg: DistillConfig, complete: bool, summary: dict | None = None) -> None:
    from tipcli.shards import MANIFEST, SCHEMA_VERSION

    run = Path(cfg.output)
    mpath = run / MANIFEST
    if mpath.is_file():
        old = json.loads(mpath.read_text())
        if old.get("stage") != "distill" or old.get("config") != to_dict(cfg):
            raise TipError(f"{run} holds a different run (other settings); choose another -o")
    elif run.is_dir() and any(run.iterdir()):
        raise TipError(f"output directory {run} is not empty and holds no tip manifest; "
                       "choose another -o")
    run.mkdir(parents=True, exist_ok=True)
    data = {"schema_version": SCHEMA_VERSION, "stage": "distill", "complete": complete,
            "config": to_dict(cfg), "shards": [], "summary": summary or {}}
    tmp = run / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(mpath)


def _render(history: list[dict[str, Any]]) -> None:
    from rich.table import Table

    from tipcli.progress import console

    table = Table(title="tip distill")
    for col in ("iteration", "rollout tokens", "mean rkl", "train loss", "accuracy (95% CI)"):
        table.add_column(col, justify="right")
    for h in history:
        acc = f"{h['accuracy']:.3f} ({h['interval_95'][0]:.3f}-{h['interval_95'][1]:.3f})" \
            if "accuracy" in h else "-"
        fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else "-"  # noqa: E731
        table.add_row(str(h["iteration"]), str(h.get("rollout_tokens", "-")),
                      fmt(h.get("mean_rkl")), fmt(h.get("train_loss")), acc)
    console.print(table)
